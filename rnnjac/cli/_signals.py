"""Interrupts and scoped output of one command: SIGINT/SIGTERM handling, the honest interruption line,
rnnjac's log lines and warnings as one line each in the command line's terms."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import warnings
from contextlib import contextmanager

from ._messages import cli_message


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an exception by :func:`main` so that cleanup runs as for Ctrl-C (exit status 143)."""


@contextmanager
def _signals(received: list):
    """SIGINT -> KeyboardInterrupt, SIGTERM -> :class:`Terminated` (once), recording each in ``received``.

    A signal the process was started to ignore (``SIG_IGN``) stays ignored; the previous handlers are
    restored afterwards. Outside the main thread nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        received.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        if received.count(signal.SIGTERM) == 1:  # a second SIGTERM must not break the cleanup of the first
            raise Terminated

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)


def _interrupted(err: BaseException | None, received: list, written: list) -> int:
    """Print the honest one-line interruption message; return 143 for SIGTERM, else 130."""
    own = " ".join(str(err).split()) if isinstance(err, KeyboardInterrupt) else ""
    if own:
        msg = cli_message(own)
    elif err is None:
        done = f"its outputs are complete: {', '.join(map(str, written))}" if written else "nothing was written"
        msg = f"interrupted after the command had finished; {done}"
    elif written:
        msg = (
            f"interrupted; these outputs were written completely: {', '.join(map(str, written))}; "
            "the others were not written (existing files are unchanged)"
        )
    else:
        msg = "interrupted; nothing was written (existing files are unchanged)"
    print(f"rnnjac: {msg}", file=sys.stderr)
    first = received[0] if received else (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
    return 128 + int(first)


@contextmanager
def _scoped_output(verbose: bool):
    """During one command: rnnjac's log lines and warnings as one line each on stderr, in CLI terms.

    Scoped (a handler on the ``rnnjac`` logger and ``warnings.showwarning`` inside
    ``warnings.catch_warnings``), so nothing process-wide changes; other libraries' warnings pass through.
    """

    class Formatter(logging.Formatter):
        def format(self, record):
            return "rnnjac: " + cli_message(record.getMessage())

    from ..errors import RnnjacWarning

    logger = logging.getLogger("rnnjac")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Formatter())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, RnnjacWarning):
                return shown(message, category, filename, lineno, file, line)
            print(f"rnnjac: warning: {cli_message(' '.join(str(message).split()))}", file=file or sys.stderr)

        warnings.showwarning = showwarning
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
