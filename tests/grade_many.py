"""Run `assignments/grade.py ARGS` in many copies of the repository from one process, for
tests/test_assignments.py: torch is imported once instead of once per copy, and each copy's own
modules are imported afresh, exactly as a separate `python assignments/grade.py` would.

Usage: python tests/grade_many.py JOBS.json, where JOBS.json is [[copy_dir, [args..]], ...];
prints one JSON list of [exit status, stdout and stderr] per job.
"""

import contextlib
import io
import json
import os
import runpy
import sys

import torch  # noqa: F401  (imported once for every job: the point of this script)


def copy_modules(dirs):
    """The names of the loaded modules that some copy's files define (to be imported afresh)."""
    names = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and any(os.path.abspath(path).startswith(d + os.sep) for d in dirs):
            names.append(name)
    return names


def run(copy_dir, args, seen):
    for name in copy_modules(seen):
        del sys.modules[name]
    os.chdir(copy_dir)
    sys.argv = ["assignments/grade.py", *args]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_path(os.path.join(copy_dir, "assignments", "grade.py"), run_name="__main__")
            status = 0
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # a crash of the grader itself: reported like a subprocess's
            print(f"Traceback: {type(e).__name__}: {e}", file=sys.stderr)
            status = 1
    return [status, out.getvalue()]


def main():
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    path, seen, results = list(sys.path), [], []
    for copy_dir, args in jobs:
        copy_dir = os.path.abspath(copy_dir)
        sys.path[:] = [os.path.join(copy_dir, "assignments"), *path]  # as `python assignments/grade.py` has it
        seen.append(copy_dir)
        results.append(run(copy_dir, args, seen))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
