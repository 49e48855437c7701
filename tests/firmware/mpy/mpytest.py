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


def micropython_only(why):
    """First line of a test that measures MicroPython itself: under CPython (pytest) the test
    is reported as skipped, with why, rather than passing without having checked anything."""
    import sys

    if sys.implementation.name != "micropython":
        import pytest

        pytest.skip(why)
