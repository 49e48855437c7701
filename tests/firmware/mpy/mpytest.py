# A tiny assertion helper for tests that run under both CPython (pytest) and MicroPython.


class raises:
    """with raises(Malformed): ...  -- fails unless the block raises that exception type."""

    def __init__(self, exc):
        self.exc = exc

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is None:
            raise AssertionError("did not raise %s" % self.exc.__name__)
        return issubclass(et, self.exc)
