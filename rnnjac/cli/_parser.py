"""The ``rnnjac`` argument parser: one sub-parser per command (imports neither torch nor xarray)."""

from __future__ import annotations

import argparse

from .._version import __version__
from ._commands import cmd_analyze, cmd_info, cmd_plot, cmd_verify
from ._demo import cmd_demo
from ._fixed import cmd_fixed_points

EPILOG = "Docs and examples: README.md (section 'Command line')."


# ----------------------------------------------------------------------------- arguments
UNSAFE_HELP = "load a whole pickled module or object: --unsafe executes code from the file: only for files you trust"
METHOD_HELP = (
    "how the Jacobians are computed: analytic (closed form), autograd, or auto = analytic where rnnjac has "
    "the closed form, else autograd (default auto)"
)

CHECK_HELP = (
    "also check the largest Lyapunov exponent by direct simulation of two nearby trajectories (the model's own "
    "forward, no Jacobian) against the QR estimate; print it, record it (lyapunov_check_* attrs), exit 1 on "
    "disagreement"
)


def _add_input_options(p: argparse.ArgumentParser, *, batch: int, steps: int) -> None:
    g = p.add_argument_group("inputs (a file, or generated)")
    g.add_argument("--inputs", metavar="FILE", help=".npy, .npz, .pt or .nc array of shape (B, T, I)")
    g.add_argument("--inputs-key", metavar="NAME", help="array name inside .npz/.pt/.nc files holding several")
    g.add_argument("--time-major", action="store_true", help="the file's array is (T, B, I)")
    g.add_argument("--batch", type=int, default=batch, metavar="B", help=f"generated trials (default {batch})")
    g.add_argument("--steps", type=int, default=steps, metavar="T", help=f"generated steps (default {steps})")
    g.add_argument(
        "--input-std", type=float, default=1.0, metavar="S", help="std of generated Gaussian inputs, > 0 (default 1)"
    )
    g.add_argument("--autonomous", action="store_true", help="zero input (the autonomous system)")
    g.add_argument("--h0", choices=("zeros", "random"), default="zeros", help="initial state (default zeros)")
    g.add_argument("--seed", type=int, default=0, help="seed for generated inputs, h0 and tangents (default 0)")
    m = _add_checkpoint_options(p)
    m.add_argument("--state", choices=("full", "h"), default="full", help="full state [h; c] or h only (default full)")
    m.add_argument("--method", choices=("auto", "analytic", "autograd"), default="auto", help=METHOD_HELP)
    m.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    m.add_argument(
        "--dtype", choices=("float32", "float64"), help="analyse a converted copy (default: the checkpoint's)"
    )
    w = p.add_argument_group("the recurrent core of your own model (needs --inputs)")
    w.add_argument(
        "--model",
        metavar="MODULE:CLASS",
        help="build this model class (importable, e.g. mypackage.models:Net), load the checkpoint into it strictly "
        "and analyse its recurrent submodule on what the model's own layers feed it from --inputs",
    )
    w.add_argument(
        "--model-kwargs",
        metavar="JSON",
        help="keyword arguments of the class as a JSON object, e.g. '{\"hidden\": 64}'",
    )
    w.add_argument("--submodule", metavar="NAME", help="dotted name of the recurrent submodule (default: the only one)")
    _add_threads(p)


def _add_checkpoint_options(p: argparse.ArgumentParser):
    """The options that say how a checkpoint is read; returns their group."""
    m = p.add_argument_group("model")
    m.add_argument("--arch", choices=("rnn", "gru", "lstm"), help="check the inferred architecture")
    m.add_argument(
        "--nonlinearity",
        choices=("tanh", "relu"),
        help="required for an nn.RNN checkpoint that does not record it (not inferable from the weights); "
        "an error for GRU/LSTM",
    )
    m.add_argument("--prefix", help="which recurrent module when the checkpoint holds several (e.g. 'encoder.rnn.')")
    m.add_argument("--unsafe", action="store_true", help=UNSAFE_HELP)
    return m


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch (default: what torch picks, usually all cores); on a shared machine give each "
        "process cores / processes",
    )


def _add_out(p: argparse.ArgumentParser, help: str, *, required: bool = False, default=None, metavar="FILE") -> None:
    p.add_argument("-o", "--out", required=required, default=default, metavar=metavar, help=help)


def _add_common(p: argparse.ArgumentParser, *, quiet: str | None = None) -> None:
    if quiet:
        p.add_argument("-q", "--quiet", action="store_true", help=quiet)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_analyze(sub) -> None:
    a = sub.add_parser(
        "analyze",
        help="spectra of one checkpoint (or a sweep over many) -> netCDF/zarr",
        description="Compute per-step singular values, Lyapunov exponents (and optionally eigenvalues, "
        "end-to-end singular values) of checkpoints and write them to a file.",
        epilog=EPILOG,
    )
    a.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint file(s) or glob pattern(s)")
    _add_out(a, "output file: .nc (netCDF) or .zarr (needs the zarr package)", required=True)
    a.add_argument(
        "--overwrite", action="store_true", help="replace an existing output that rnnjac wrote (never a folder)"
    )
    a.add_argument(
        "-k", "--num-exponents", dest="k", type=int, metavar="K", help="how many Lyapunov exponents (default all D)"
    )
    a.add_argument("--k", dest="k", type=int, help=argparse.SUPPRESS)  # old name, kept for scripts
    a.add_argument(
        "--warmup",
        type=_int_or_auto,
        default=0,
        metavar="N|auto",
        help="steps of state evolution before tangents, or auto: chosen from the run by the MSER rule, recorded as "
        "the warmup_used attribute (default 0)",
    )
    a.add_argument(
        "--tangent-warmup",
        type=_int_or_auto,
        default=0,
        metavar="N|auto",
        help="tangent steps not counted, or auto (recorded as tangent_warmup_used) (default 0)",
    )
    a.add_argument(
        "--reortho-every",
        type=_int_or_auto,
        default=1,
        metavar="N|auto",
        help="steps between QR re-orthonormalisations, or auto: as rarely as keeps the exponents of a QR every step "
        "(intervals recorded as reortho_interval_min/_mean/_max) (default 1)",
    )
    a.add_argument(
        "--ci",
        type=_confidence,
        default=0.95,
        metavar="LEVEL",
        help="confidence level of the exponents' intervals, or 'none' to skip them (default 0.95)",
    )
    a.add_argument("--check-lyapunov", action="store_true", help=CHECK_HELP + " (one checkpoint)")
    a.add_argument("--eigenvalues", action="store_true", help="also per-step eigenvalues and spectral radius")
    a.add_argument("--end-to-end", action="store_true", help="also singular values of ds_t/ds_0")
    a.add_argument(
        "--local-lyapunov", dest="local", action="store_true", help="also per-step (local) Lyapunov exponents"
    )
    a.add_argument("--local", dest="local", action="store_true", help=argparse.SUPPRESS)  # old name
    a.add_argument("--keep-states", action="store_true", help="also store the states")
    a.add_argument("--no-singular-values", action="store_true", help="skip per-step singular values")
    a.add_argument(
        "--singular-values",
        type=_int_or_auto,
        metavar="K",
        help="keep only the top K per-step singular values (cheaper for large models; default all)",
    )
    a.add_argument(
        "--sensitivity",
        action="store_true",
        help="also the lagged input sensitivities ds_t/dx_(t-lag), lag 0..--max-lag (log norms and singular values; "
        "one checkpoint)",
    )
    a.add_argument(
        "--max-lag", type=int, metavar="L", help="largest lag of --sensitivity, 0 <= L < the number of steps"
    )
    a.add_argument("--no-lyapunov", action="store_true", help="skip Lyapunov exponents")
    a.add_argument("--scheduler", metavar="ADDRESS", help="sweeps: a dask.distributed scheduler address")
    a.add_argument("--workers", type=int, metavar="N", help="sweeps: start a local Dask cluster with N workers")
    _add_input_options(a, batch=8, steps=200)
    _add_common(a, quiet="no progress bar")
    a.set_defaults(func=cmd_analyze)


def _add_verify(sub) -> None:
    v = sub.add_parser(
        "verify",
        help="check a checkpoint's Jacobians against float64 finite differences",
        description="Compare the Jacobians (closed form or autograd) with central finite differences in "
        "float64; print a table; exit 0 on pass, 1 on fail.",
        epilog=EPILOG,
    )
    v.add_argument("checkpoint", metavar="CKPT", help="checkpoint file")
    v.add_argument("--eps", type=float, help="relative finite-difference step (default u^(1/3) = 6e-6)")
    v.add_argument(
        "--rtol", type=float, default=1e-6, help="relative tolerance: pass if |error| <= atol + rtol*|J| (default 1e-6)"
    )
    v.add_argument("--atol", type=float, default=1e-8, help="absolute tolerance (default 1e-8)")
    v.add_argument("--directions", type=int, help="directional check along this many random vectors (cheap for big D)")
    v.add_argument(
        "--check-lyapunov",
        action="store_true",
        help=CHECK_HELP + "; give it a few hundred --steps (opt-in: a statistical test, it fails 5%% of correct runs)",
    )
    _add_out(v, "also write the verification Dataset (.nc or .zarr)")
    v.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out file that rnnjac wrote (never a folder)"
    )
    _add_input_options(v, batch=2, steps=20)
    _add_common(v, quiet="print only the result line, not the table")
    v.set_defaults(func=cmd_verify)


def _add_fixed_points(sub) -> None:
    f = sub.add_parser(
        "fixed-points",
        help="fixed points and slow points of a checkpoint under constant input -> netCDF/zarr and figures",
        description="Search fixed points s = F(s, x*) of the checkpoint's recurrent module for a constant input x* "
        "(damped Newton on the closed-form Jacobian, or Adam), from random states or states of trajectories; "
        "print how many are stable, unstable (saddles) and slow, and write the Dataset and its figures.",
        epilog=EPILOG,
    )
    f.add_argument("checkpoint", metavar="CKPT", help="checkpoint file")
    x = f.add_argument_group("the constant input x* (default zeros)")
    one = x.add_mutually_exclusive_group()
    one.add_argument(
        "--inputs", metavar="FILE", help=".npy, .npz, .pt or .nc array: one input (I,) or C of them (C, I)"
    )
    one.add_argument("--input-value", type=float, nargs="+", metavar="V", help="the I values of one constant input")
    x.add_argument("--inputs-key", metavar="NAME", help="array name inside .npz/.pt/.nc files holding several")
    s0 = f.add_argument_group("initial states of the searches")
    s0.add_argument(
        "--n-initial",
        type=int,
        metavar="N",
        help="how many (default: 1024 states of the trajectories, or 128 random states in [-1, 1]^D)",
    )
    s0.add_argument(
        "--from-trajectories",
        type=int,
        nargs=2,
        metavar=("B", "T"),
        help="draw them from the states of B trajectories of T steps on Gaussian inputs (std 1, --seed)",
    )
    s0.add_argument("--noise", type=float, default=0.0, help="std of Gaussian noise added to them (default 0)")
    s0.add_argument("--seed", type=int, default=0, help="seed of the inputs, the draw and the noise (default 0)")
    g = f.add_argument_group("solver")
    g.add_argument("--method", choices=("newton", "adam"), default="newton", help="solver (default newton)")
    g.add_argument(
        "--tol", type=float, default=1e-10, help="a fixed point has q = |F(s) - s|^2 / 2 <= tol (default 1e-10)"
    )
    g.add_argument("--max-iter", type=int, help="iteration limit (default 200 for newton, 20000 for adam)")
    g.add_argument("--state", choices=("full", "h"), default="full", help="full state [h; c] or h only (default full)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    _add_checkpoint_options(f)
    _add_out(f, "write the fixed-point Dataset (.nc or .zarr)")
    f.add_argument("--plot-dir", metavar="DIR", help="write the fixed-point figures into this folder")
    f.add_argument("--overwrite", action="store_true", help="replace existing outputs that rnnjac wrote")
    _add_threads(f)
    _add_common(f, quiet="print only the counts line, not the table")
    f.set_defaults(func=cmd_fixed_points)


def _int_or_auto(text: str):
    """An integer, ``auto``, or the text itself: :class:`~rnnjac._options.SpectraOptions` (or the command) refuses
    anything else in one line that names the flag."""
    word = text.strip()
    if word.lower() == "auto":
        return "auto"
    try:
        return int(word)
    except ValueError:
        return word


def _confidence(text: str):
    """``--ci``: a number (checked by SpectraOptions, so the error names the flag) or ``none``."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a level such as 0.95, or 'none'; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``rnnjac`` argument parser (one sub-parser per command)."""
    parser = argparse.ArgumentParser(
        prog="rnnjac",
        description="Recurrent networks as dynamical systems: Jacobians, their verification, spectra and plots.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"rnnjac {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_analyze(sub)
    _add_verify(sub)
    _add_fixed_points(sub)

    p = sub.add_parser(
        "plot",
        help="figures of a spectra file",
        description="One figure per variable present, plus a summary panel, named SPECTRA-STEM_NAME.FORMAT. "
        "All figures are drawn and every target checked before the first file is written.",
        epilog=EPILOG,
    )
    p.add_argument("spectra", metavar="SPECTRA", help="a file written by 'rnnjac analyze' (.nc or .zarr)")
    _add_out(p, "output folder, created if missing (default ., the current folder)", default=".", metavar="DIR")
    p.add_argument("--format", choices=("png", "pdf", "svg"), default="png", help="figure file format (default png)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing figures of the same names (only figures rnnjac wrote)",
    )
    _add_common(p)
    p.set_defaults(func=cmd_plot)

    i = sub.add_parser(
        "info",
        help="describe a checkpoint or a spectra file",
        description="Print what rnnjac reads from a checkpoint (architecture, sizes, nonlinearity, metadata) "
        "or a spectra file (dims, variables, provenance), without computing anything.",
        epilog=EPILOG,
    )
    i.add_argument("path", metavar="PATH", help="a checkpoint (.pt, .pth, .ckpt, .safetensors) or a .nc/.zarr file")
    i.add_argument("--prefix", help="which recurrent module when the checkpoint holds several (e.g. 'encoder.rnn.')")
    i.add_argument("--unsafe", action="store_true", help=UNSAFE_HELP)
    _add_common(i)
    i.set_defaults(func=cmd_info)

    d = sub.add_parser(
        "demo",
        help="the whole pipeline on the GRU flip-flop checkpoint shipped with rnnjac",
        description="Load the bundled 3-bit flip-flop GRU, verify its Jacobians, analyse its spectra, find its "
        "fixed points and plot them into DIR (spectra.nc, fixed_points.nc and one figure per plot).",
        epilog=EPILOG,
    )
    _add_out(d, "output folder, created if missing (default rnnjac-demo)", default="rnnjac-demo", metavar="DIR")
    d.add_argument("--overwrite", action="store_true", help="replace files from an earlier demo run")
    _add_threads(d)
    _add_common(d, quiet="print only the final line (no steps, no progress bar)")
    d.set_defaults(func=cmd_demo)
    return parser
