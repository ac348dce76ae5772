"""SIGTERM and SIGHUP end a command like Ctrl-C does: as an exception, so that every cleanup
(`finally`, temporary files and directories) runs before the process exits with 128 + signum."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM or SIGHUP arrives (a BaseException, like KeyboardInterrupt,
    so that `except Exception` clauses do not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):
    for s in SIGNALS:                   # a second signal must not interrupt the cleanup
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


@contextmanager
def signals_raise():
    """Within the block, SIGTERM/SIGHUP raise Terminated; the previous handlers are restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
