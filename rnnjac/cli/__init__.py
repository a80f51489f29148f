"""The ``rnnjac`` command line: analyze, verify, plot, info, demo.

Every error the user can fix is one line on stderr and exit status 2 (``--debug`` shows the
traceback), in the command line's terms (the library's ``overwrite=True`` reads ``--overwrite`` here:
see :func:`cli_message`); ``verify`` exits 1 when a check fails. Every command checks all its outputs
before any work and writes each atomically (``rnnjac._io``). SIGINT exits 130 and SIGTERM 143, after
the clean-up, with one line that says what was written: every output is either as it was or complete.

Layout: :mod:`._parser` (the arguments), :mod:`._messages` (keywords -> flags), :mod:`._commands` (analyze,
verify, plot, info), :mod:`._fixed` (fixed-points), :mod:`._demo`, :mod:`._output` (shared output helpers,
:func:`write_plots`), :mod:`._signals` (interrupts, scoped warnings). None of them imports torch or xarray at
import time, so ``rnnjac --help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

from ._commands import cmd_analyze, cmd_info, cmd_plot, cmd_verify
from ._demo import DEMO_CHECKPOINT, DEMO_OPTIONS, cmd_demo
from ._messages import FLAGS, NEGATED, _error_line, cli_message
from ._output import plot_targets, write_plots
from ._parser import EPILOG, build_parser
from ._signals import Terminated, _interrupted, _scoped_output, _signals

__all__ = [
    "main",
    "build_parser",
    "cli_message",
    "write_plots",
    "plot_targets",
    "FLAGS",
    "NEGATED",
    "EPILOG",
    "Terminated",
    "DEMO_CHECKPOINT",
    "DEMO_OPTIONS",
    "cmd_analyze",
    "cmd_verify",
    "cmd_plot",
    "cmd_info",
    "cmd_demo",
]


@contextmanager
def _threads(n: int | None):
    """``torch.set_num_threads(n)`` for one command (``--threads``), restored afterwards; None: torch's choice."""
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be an integer >= 1; got {n!r}")
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv=None) -> int:
    """Run the command line; returns the exit status.

    0 ok, 1 verification failed, 2 bad input (one line on stderr; ``--debug`` for the traceback),
    130 interrupted by SIGINT (Ctrl-C), 143 by SIGTERM. An interruption leaves every output either as
    it was or complete, and says which.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "gru.pt")
    >>> torch.save(torch.nn.GRU(2, 3).state_dict(), path)
    >>> main(["info", path])  # doctest: +ELLIPSIS
    checkpoint .../gru.pt
    arch: gru
    ...
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.written = []
    received: list = []
    with _signals(received), _scoped_output(args.verbose):
        try:
            with _threads(getattr(args, "threads", None)):
                code = args.func(args, argv)
        except KeyboardInterrupt as err:
            return _interrupted(err, received, args.written)
        except BrokenPipeError:  # the reader went away (e.g. `| head`): not an error of ours
            sys.stderr.close()
            return 0
        except Exception as err:  # noqa: BLE001 - every error becomes one line unless --debug
            if received:  # an interrupt that a library turned into another error
                return _interrupted(err, received, args.written)
            if args.debug:
                raise
            print(f"rnnjac: error: {_error_line(err)}", file=sys.stderr)
            return 2
        if received:  # the signal arrived while a library held it back, after the work was done
            return _interrupted(None, received, args.written)
        return code
