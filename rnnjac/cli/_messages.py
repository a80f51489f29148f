"""The command line's words: library keywords -> flags (:func:`cli_message`), printable text, error lines.

The library speaks its Python keywords (``overwrite=True``, ``nonlinearity=``); the command line translates
them into its flags here, and only here.
"""

from __future__ import annotations

import re

FLAGS = {
    "overwrite": "--overwrite",
    "nonlinearity": "--nonlinearity",
    "prefix": "--prefix",
    "unsafe": "--unsafe",
    "arch": "--arch",
    "k": "--num-exponents",
    "warmup": "--warmup",
    "tangent_warmup": "--tangent-warmup",
    "reortho_every": "--reortho-every",
    "ci": "--ci",
    "eigenvalues": "--eigenvalues",
    "end_to_end": "--end-to-end",
    "local_lyapunov": "--local-lyapunov",
    "keep_states": "--keep-states",
    "state": "--state",
    "method": "--method",
    "dtype": "--dtype",
    "device": "--device",
    "eps": "--eps",
    "rtol": "--rtol",
    "atol": "--atol",
    "directions": "--directions",
    "batch": "--batch",
    "steps": "--steps",
    "input_std": "--input-std",
    "autonomous": "--autonomous",
    "seed": "--seed",
    "key": "--inputs-key",
    "time_major": "--time-major",
    "workers": "--workers",
    "scheduler": "--scheduler",
    "threads": "--threads",
    "model": "--model",
    "model_kwargs": "--model-kwargs",
    "submodule": "--submodule",
    "n_initial": "--n-initial",
    "noise": "--noise",
    "tol": "--tol",
    "max_iter": "--max-iter",
    "check_lyapunov": "--check-lyapunov",
    "singular_values": "--singular-values",
    "max_lag": "--max-lag",
}
# keywords whose flag is the negation: ``lyapunov=False`` is ``--no-lyapunov``
NEGATED = {"lyapunov": "--no-lyapunov", "singular_values": "--no-singular-values"}
_NAMES = "|".join(sorted({*FLAGS, *NEGATED}, key=len, reverse=True))
_LEAD = r"(?<![\w.\-])"
_VALUE = r"('[^'\s]*'|\"[^\"\s]*\"|[^\s,;)\]]+)?"
_ASSIGN = re.compile(rf"{_LEAD}(?:(pass|with) )?({_NAMES})={_VALUE}")
_SUBJECT = re.compile(rf"(?:^|(?<=[;:,] )|(?<=\band ))({_NAMES})(?= must\b)|(?<=\bleave )({_NAMES})(?= out\b)")
_ECHO = re.compile(r"\s*\((?:CLI: *)?--[a-z][a-z0-9-]*\)")  # an old "keyword (--flag)" pair: keep the keyword


def _flag_for(name: str, value: str | None) -> str:
    """The command-line spelling of ``name=value`` (``value`` None: the bare ``name=``)."""
    if name in NEGATED and (name not in FLAGS or value == "False"):  # singular_values=3 is --singular-values 3
        return NEGATED[name] if value in (None, "False") else f"without {NEGATED[name]}"
    flag = FLAGS[name]
    if value in (None, "True", "..."):
        return flag
    if value == "False":
        return f"without {flag}"
    if len(value) > 2 and value[0] == value[-1] and value[0] in "'\"" and re.fullmatch(r"[\w.:/-]+", value[1:-1]):
        value = value[1:-1]
    return f"{flag} {value}"


def cli_message(message: str) -> str:
    """Translate a library message's Python keywords into the command line's flags.

    Examples
    --------
    >>> cli_message("s.nc already exists; pass overwrite=True to replace it")
    's.nc already exists; use --overwrite to replace it'
    >>> cli_message("r.pt does not record its nonlinearity; pass nonlinearity='relu' or 'tanh'")
    "r.pt does not record its nonlinearity; use --nonlinearity relu or 'tanh'"
    >>> cli_message("k must be an integer with 1 <= k <= D = 12; got 99")
    '--num-exponents must be an integer with 1 <= k <= D = 12; got 99'
    """
    message = _ECHO.sub("", message)

    def assign(m: re.Match) -> str:
        verb = {"pass": "use ", "with": "with "}.get(m.group(1) or "", "")
        return verb + _flag_for(m.group(2), m.group(3))

    message = _ASSIGN.sub(assign, message)
    message = _SUBJECT.sub(lambda m: _flag_for(m.group(1) or m.group(2), None), message)
    return message.replace(
        "--singular-values must be True, False or an integer", "--singular-values must be an integer"
    )


def _printable(value) -> str:
    """``str(value)`` with control and other non-printable characters escaped (``\\x1b``), as ``repr`` does."""
    text = str(value)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _error_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno is not None and err.strerror and len(err.args) >= 2:
        where = err.filename2 or err.filename
        text = f"{where}: {err.strerror}" if where else err.strerror
    else:
        text = str(err)
    msg = cli_message(" ".join(text.split())) or type(err).__name__
    known = (ValueError, TypeError, OSError, ImportError, LookupError)
    if not isinstance(err, known):
        msg = f"{type(err).__name__}: {msg} (rerun with --debug for the traceback)"
    return msg
