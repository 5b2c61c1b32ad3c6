"""Process-wide settings of a command-line run, made once where the CLI starts, and the one
way the CLI runs a server (``run_until_signalled``: it stops what it started).

Libraries do not set log levels, warning filters or ``sys.path`` at import; ``configure()``
does, for the ``mpq`` command (and for ``search.session.run_search``, which scripts call).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import warnings


def configure() -> None:
    """Quiet libraries' chatter; make modules next to the current directory importable.

    - like ``python -m`` and uvicorn, a user's ``module:function`` next to where mpq runs
      imports (Ray's workers get the same through their ``PYTHONPATH``);
    - Optuna's per-trial INFO lines and MLflow's INFO logs would drown the progress bar (this
      is the one place mpq writes ``os.environ``, besides Ray's token mode for an attach);
    - heartbeats are marked experimental and "meant for Study.optimize": the runner records
      them itself for its ask/tell trials, which is what makes stale trials detectable.
    """
    import optuna

    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # MLflow sets its loggers' level when it is imported (later, lazily): its own variable
    # is the supported way to have that level be WARNING; the logger covers an earlier import
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # a tracking server's "View run ... at" two lines per finished run: mpq prints the one
    # line per trial and the UI command itself
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    # notices on every run that say nothing about this run: MLflow's database migrations
    # (alembic), matplotlib's font cache, Ray's "token authentication is enabled" (kept on,
    # which is what mpq wants; its "disabled" warning, a real risk, still shows)
    for name in ("alembic", "matplotlib.font_manager"):
        logging.getLogger(name).setLevel(logging.WARNING)
    token_setup = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropMessage) for f in token_setup.filters):
        token_setup.addFilter(_DropMessage("Token authentication is enabled for this Ray"))


class _DropMessage(logging.Filter):
    """Drops the log records whose message starts with ``prefix`` (one notice, not a level)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def run_until_signalled(cmd: list[str]) -> int:
    """Run a server in a process group of its own; on SIGINT or SIGTERM stop that whole group
    (MLflow's server forks uvicorn and huey workers, which a plain call would leave listening)
    and return 130 / 143; a group that ignores SIGTERM gets SIGKILL 15 s later. Returns the
    server's exit status when it stops by itself.

    NOTE: the handler only signals: waiting for the child inside it would deadlock on the lock
    of the ``Popen.wait`` it interrupted.
    """
    import threading

    proc = subprocess.Popen(cmd, start_new_session=True)
    received: list[int] = []

    def kill(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def stop(signum: int, _frame: object) -> None:
        received.append(signum)
        kill(signal.SIGTERM)
        timer = threading.Timer(15, kill, (signal.SIGKILL,))
        timer.daemon = True
        timer.start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    status = proc.wait()
    return 128 + received[0] if received else status
