"""Imported first by every script, before torch: from the first moments (importing torch takes a
second or two), Ctrl-C ends the process with the one line `interrupted (Ctrl-C)` and exit status
130, not a traceback. cli.run_main then puts Python's own handler back, so that Ctrl-C raises
KeyboardInterrupt and train.py can save first. Imported by anything but one of the scripts (a
test, say), it does nothing.
"""

import os
import signal
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))


def _interrupted(signum, frame):
    sys.stderr.write("\ninterrupted (Ctrl-C)\n")
    os._exit(130)  # nothing is open yet that needs closing


_script = getattr(sys.modules.get("__main__"), "__file__", None) or ""
if os.path.dirname(os.path.abspath(_script)) in (ROOT, os.path.join(ROOT, "tools")):
    signal.signal(signal.SIGINT, _interrupted)
