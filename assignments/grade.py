"""Grade an assignment (`python assignments/grade.py 3`, or `all`) in a student copy or the reference.

Runs assignments/checks/check_N.py and prints PASS or FAIL (with a hint) per check; exit status 0
only when all pass. The checks use tiny random models and independent references (brute-force
masks, a plain causal forward, plain decoding), so they judge behaviour in seconds. Read next:
checks/common.py.
"""

import argparse
import importlib
import os
import signal
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(HERE, "checks")]

from make import ASSIGNMENTS, HANDOUTS, parse_numbers  # noqa: E402  (needs the path above)

CHECK_SECONDS = 60  # a check that runs longer is stuck (an endless walk, say): it fails


class TimedOut(Exception):
    pass


def _alarm(signum, frame):
    raise TimedOut(f"took longer than {CHECK_SECONDS} s (an endless loop?)")


def describe(e: BaseException) -> str:
    """One line on what went wrong, with the student-code line that raised it where there is one."""
    if isinstance(e, NotImplementedError):
        return f"not implemented yet: {e}"
    where = ""
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        path = os.path.abspath(frame.filename)
        if path.startswith(ROOT) and not path.startswith(HERE):
            where = f" [{os.path.relpath(path, ROOT)}:{frame.lineno}]"
            break
    text = str(e).strip().split("\n")[0] or type(e).__name__
    return f"{type(e).__name__ if not isinstance(e, AssertionError) else 'wrong'}: {text}{where}"


def grade(n: int, first_failure: bool = False) -> tuple[int, int]:
    """Run assignment n's checks; returns (passed, total)."""
    import torch
    from common import CHECKS
    torch.set_num_threads(1)  # tiny models: a second thread only adds overhead
    name = f"check_{n}"
    module = importlib.import_module(name)
    checks = [(fn, hint) for mod, fn, hint in CHECKS if mod == module.__name__]
    print(f"assignment {n}: {ASSIGNMENTS[n][0]} (handout: assignments/{HANDOUTS[n]})")
    passed = ran = 0
    for fn, hint in checks:
        ran += 1
        t0 = time.perf_counter()
        use_alarm = hasattr(signal, "SIGALRM")
        if use_alarm:
            signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(CHECK_SECONDS)
        try:
            torch.manual_seed(0)
            fn()
            ok, why = True, ""
        except Exception as e:  # a student's bug may raise anything: it is a failed check, not a crash
            ok, why = False, describe(e)
        finally:
            if use_alarm:
                signal.alarm(0)
        label = fn.__name__.removeprefix("check_").replace("_", " ")
        dt = time.perf_counter() - t0
        if ok:
            passed += 1
            print(f"  PASS  {label} ({dt:.1f} s)")
        else:
            print(f"  FAIL  {label}: {why}\n        hint: {hint}")
            if first_failure:
                break
    stopped = f" ({len(checks) - ran} not run: --first-failure)" if ran < len(checks) else ""
    print(f"assignment {n}: {passed}/{ran} checks passed{stopped}")
    return passed, len(checks)


def main(argv=None):
    p = argparse.ArgumentParser(description="Run an assignment's checks and print PASS/FAIL per check.")
    p.add_argument("assignment", help="assignment number (1-6), or 'all'")
    p.add_argument("--first-failure", action="store_true", help="stop at the first failed check")
    args = p.parse_args(argv)
    try:
        numbers = parse_numbers(args.assignment)
    except ValueError as e:
        sys.exit(f"error: {e}")
    results = [grade(n, args.first_failure) for n in numbers]
    ok = all(passed == total for passed, total in results)
    if len(numbers) > 1:
        print(f"all: {sum(p for p, _ in results)}/{sum(t for _, t in results)} checks passed")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
