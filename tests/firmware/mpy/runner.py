# Runs tests/firmware/mpy/test_*.py under the MicroPython unix port: every test_* function of the
# named modules. Usage: micropython runner.py test_x [test_y ...]  (the repo root on MICROPYPATH).
# Prints one line per test and a closing "N passed, N failed" line; exits 1 if any failed.
import sys


def main(names):
    passed = failed = 0
    for name in names:
        mod = __import__(name)
        for attr in sorted(dir(mod)):
            if not attr.startswith("test_"):
                continue
            fn = getattr(mod, attr)
            try:
                fn()
            except Exception as e:
                failed += 1
                print("FAIL %s.%s: %s: %s" % (name, attr, type(e).__name__, e))
                sys.print_exception(e)
            else:
                passed += 1
                print("ok   %s.%s" % (name, attr))
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


sys.exit(main(sys.argv[1:]))
