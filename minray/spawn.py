"""Starting minray's own processes (node manager, control store, zygote).

Each must import the same minray as the process that starts it, whatever the
current directory holds: `python -m minray...` run from a source checkout
would import the unbuilt ./minray instead of the installed package. So the
child gets the parent's package directory first on sys.path, and the entry
point is named by "module:function" instead of run with -m.

A child that fails while importing or starting appends its traceback to the
file named by STARTUP_LOG_ENV (if set), so the parent can show the reason in
the error it raises.
"""
import os
import sys

STARTUP_LOG_ENV = "MINRAY_STARTUP_LOG"

# The directory holding the minray package this process imported.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in the child before any minray import; plain code so that a broken
# minray (e.g. its Cython core not built) is reported like any other failure.
_BOOTSTRAP = """\
import os, sys
sys.path.insert(0, sys.argv.pop(1))
_entry = sys.argv.pop(1)
_log = os.environ.pop("MINRAY_STARTUP_LOG", None)
try:
    import importlib
    _module, _function = _entry.split(":")
    getattr(importlib.import_module(_module), _function)()
except SystemExit as _exit:
    if _log and _exit.code not in (None, 0):
        with open(_log, "a") as _f:
            _f.write(f"{_entry} exited with {_exit.code!r}\\n")
    raise
except BaseException:
    import traceback
    if _log:
        with open(_log, "a") as _f:
            traceback.print_exc(file=_f)
    raise
"""


def python_argv(entry, *args):
    """The command line running `entry` ("package.module:function") in a new
    Python process that imports this minray; `args` become its sys.argv[1:]."""
    return [sys.executable, "-c", _BOOTSTRAP, PACKAGE_PARENT, entry, *map(str, args)]


def startup_env(log_path):
    """The environment for a child whose startup failures go to log_path."""
    env = dict(os.environ)
    env[STARTUP_LOG_ENV] = log_path
    return env


def log_tail(path, lines=20):
    """The last lines of a log file, for an error message ('' if unreadable)."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return ""
