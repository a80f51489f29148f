"""The command line's words: library keywords -> flags (:func:`cli_message`), printable text, error lines.

The library speaks its Python keywords (``overwrite=True``, ``nonlinearity=``); the command line translates
them into its flags here, and only here.
"""

from __future__ import annotations

import re
import sys

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


# ----------------------------------------------------------------------------- result lines
def lyapunov_check_line(attrs: dict) -> str:
    """The ``lyapunov_check_*`` attrs as one line: both estimates of lambda_1 ± their standard errors, the
    difference against its limit, and PASS/FAIL (with what a failure means)."""
    lam, pm = _symbols()
    a = {k.removeprefix("lyapunov_check_"): v for k, v in attrs.items() if k.startswith("lyapunov_check_")}
    ok = bool(a["passed"])
    text = (
        f"{lam}1 check: {'PASS' if ok else 'FAIL'}: direct simulation {a['dns']:+.4f} {pm} {a['dns_stderr']:.4f}, "
        f"QR {a['qr']:+.4f} {pm} {a['qr_stderr']:.4f} nats/step (standard errors); difference {a['difference']:+.4f}, "
        f"allowed {a['limit']:.4f} ({100 * a['ci']:g}% level)"
    )
    if not ok:
        text += (
            "; the Jacobians may be wrong (rnnjac verify compares them with finite differences) or the run too short "
            f"(a correct model fails {100 * (1 - a['ci']):g}% of the time: rerun with more --steps or another --seed)"
        )
    return text


def _symbols() -> tuple[str, str]:
    """``("λ", "±")`` where stdout can encode them, else ``("lambda", "+/-")`` (e.g. a cp1252 file redirect)."""
    try:
        "λ±".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "lambda", "+/-"
    return "λ", "±"


def exponent_summary(ds, n: int = 3, digits: int = 4) -> str:
    """The top ``n`` exponents as ``λ1 = -0.0652 ± 0.0031, ...``: the mean over the batch ± the half-width of its
    confidence interval (``ds.attrs["ci"]``) when the Dataset has ``lyapunov_exponents_bounds``, else the median
    over the batch alone."""
    lam, pm = _symbols()
    if "lyapunov_exponents_bounds" not in ds:
        top = ds.lyapunov_exponents.median("batch").values[:n]
        return "top Lyapunov exponents (median over batch, nats/step): " + ", ".join(f"{v:+.{digits}f}" for v in top)
    mean = ds.lyapunov_exponents_mean.values[:n]
    b = ds.lyapunov_exponents_bounds
    half = (b.sel(bound="upper") - b.sel(bound="lower")).values[:n] / 2
    pairs = enumerate(zip(mean, half, strict=True))
    parts = [f"{lam}{i + 1} = {m:+.{digits}f} {pm} {h:.{digits}f}" for i, (m, h) in pairs]
    ci = float(ds.attrs.get("ci", 0.95))
    text = ", ".join(parts) + f" nats/step (mean over batch {pm} half-width of the {100 * ci:g}% interval)"
    if "lyapunov_converged" in ds and not bool(ds.lyapunov_converged.all()):
        text += (
            f"; not converged: {', '.join(f'{lam}{i + 1}' for i in (ds.lyapunov_converged.values == 0).nonzero()[0])}"
        )
    return text
