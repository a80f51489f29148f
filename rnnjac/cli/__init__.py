"""The ``rnnjac`` command line: analyze, verify, plot, info, demo.

Every error the user can fix is one line on stderr and exit status 2 (``--debug`` shows the
traceback), in the command line's terms (the library's ``overwrite=True`` reads ``--overwrite`` here:
see :func:`cli_message`); ``verify`` exits 1 when a check fails. Every command checks all its outputs
before any work and writes each atomically (``rnnjac._io``). SIGINT exits 130 and SIGTERM 143, after
the clean-up, with one line that says what was written: every output is either as it was or complete.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import re
import shlex
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

from ._version import __version__

log = logging.getLogger(__name__)

EPILOG = "Docs and examples: README.md (section 'Command line')."


# ----------------------------------------------------------------------------- arguments
UNSAFE_HELP = "load a whole pickled module or object: --unsafe executes code from the file: only for files you trust"
METHOD_HELP = (
    "how the Jacobians are computed: analytic (closed form), autograd, or auto = analytic where rnnjac has "
    "the closed form, else autograd (default auto)"
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
    m.add_argument("--state", choices=("full", "h"), default="full", help="full state [h; c] or h only (default full)")
    m.add_argument("--method", choices=("auto", "analytic", "autograd"), default="auto", help=METHOD_HELP)
    m.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    m.add_argument(
        "--dtype", choices=("float32", "float64"), help="analyse a converted copy (default: the checkpoint's)"
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
    a.add_argument("--warmup", type=int, default=0, help="steps of state evolution before tangents (default 0)")
    a.add_argument("--tangent-warmup", type=int, default=0, help="tangent steps not counted (default 0)")
    a.add_argument("--reortho-every", type=int, default=1, help="steps between QR re-orthonormalisations (default 1)")
    a.add_argument("--eigenvalues", action="store_true", help="also per-step eigenvalues and spectral radius")
    a.add_argument("--end-to-end", action="store_true", help="also singular values of ds_t/ds_0")
    a.add_argument(
        "--local-lyapunov", dest="local", action="store_true", help="also per-step (local) Lyapunov exponents"
    )
    a.add_argument("--local", dest="local", action="store_true", help=argparse.SUPPRESS)  # old name
    a.add_argument("--keep-states", action="store_true", help="also store the states")
    a.add_argument("--no-singular-values", action="store_true", help="skip per-step singular values")
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
    _add_out(v, "also write the verification Dataset (.nc or .zarr)")
    v.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out file that rnnjac wrote (never a folder)"
    )
    _add_input_options(v, batch=2, steps=20)
    _add_common(v, quiet="print only the result line, not the table")
    v.set_defaults(func=cmd_verify)


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
        description="Load the bundled 3-bit flip-flop GRU, verify its Jacobians, analyse its spectra "
        "and plot them into DIR (spectra.nc and one figure per plot).",
        epilog=EPILOG,
    )
    _add_out(d, "output folder, created if missing (default rnnjac-demo)", default="rnnjac-demo", metavar="DIR")
    d.add_argument("--overwrite", action="store_true", help="replace files from an earlier demo run")
    _add_common(d, quiet="print only the final line (no steps, no progress bar)")
    d.set_defaults(func=cmd_demo)
    return parser


# ----------------------------------------------------------------------------- messages
# The library speaks its Python keywords (``overwrite=True``, ``nonlinearity=``); the command line
# translates them into its flags here, and only here.
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
    if name in NEGATED:
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
    return _SUBJECT.sub(lambda m: _flag_for(m.group(1) or m.group(2), None), message)


def _printable(value) -> str:
    """``str(value)`` with control and other non-printable characters escaped (``\\x1b``), as ``repr`` does."""
    text = str(value)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# ----------------------------------------------------------------------------- helpers
def _input_spec(args):
    from ._pipeline import InputSpec, check_input_spec

    return check_input_spec(
        InputSpec(
            path=args.inputs,
            key=args.inputs_key,
            time_major=args.time_major,
            batch=args.batch,
            steps=args.steps,
            input_std=args.input_std,
            autonomous=args.autonomous,
            h0=args.h0,
            seed=args.seed,
        )
    )


def _load_kwargs(args) -> dict:
    return {"arch": args.arch, "nonlinearity": args.nonlinearity, "prefix": args.prefix, "unsafe": args.unsafe}


def _expand(patterns) -> list[str]:
    out = []
    for pat in patterns:
        hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
        if not hits:
            raise FileNotFoundError(f"no checkpoint matches {pat!r}")
        out += hits
    for path in out:
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
    return out


def _command_line(argv) -> str:
    return shlex.join(["rnnjac", *argv])


def _print_table(rows, headers) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    line = "  ".join(f"{h:<{w}}" for h, w in zip(headers, widths, strict=False))
    print(line)
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(f"{str(x):<{w}}" for x, w in zip(r, widths, strict=False)))


def _open_spectra(path):
    """Read a spectra file; any failure is one line that names the file."""
    from ._io import open_dataset

    try:
        return open_dataset(path)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - the reader's own messages often lack the file name
        msg = " ".join(str(err).split()) or type(err).__name__
        if str(path) in msg:
            raise
        raise ValueError(f"{path} is not a readable spectra file (.nc or .zarr written by rnnjac): {msg}") from err


def _identity(path) -> tuple | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _write(save, obj, path, *, overwrite: bool, written: list) -> Path:
    """``save(obj, path, overwrite=...)`` (an atomic ``rnnjac._io`` writer), recording ``path`` in ``written``
    once it is in place, also when an interrupt arrives right after the final rename."""
    before = _identity(path)
    try:
        save(obj, path, overwrite=overwrite)
    except KeyboardInterrupt:
        if _identity(path) not in (None, before):
            written.append(Path(path))
        raise
    except OSError as err:  # e.g. a full disk: os.write's error does not say which output
        if err.errno is None or err.filename is not None or not err.strerror:
            raise
        raise type(err)(err.errno, f"{err.strerror} (writing {path}; it is unchanged)") from err
    written.append(Path(path))
    return Path(path)


@contextmanager
def _output_folder(path: Path):
    """Create the output folder ``path`` if missing; remove it again (if still empty) when the command fails."""
    if os.path.lexists(path) and not path.is_dir():
        raise NotADirectoryError(f"output folder {path} exists and is not a folder")
    created = [p for p in [path, *path.parents] if not os.path.lexists(p)]
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for folder in created:  # deepest first, and only while empty
            if any(folder.iterdir()):
                break
            folder.rmdir()
        raise


def plot_targets(names, out_dir, fmt: str = "png", stem: str = "") -> dict[str, Path]:
    """The figure file of each plot name (and ``summary``) that :func:`write_plots` writes.

    Examples
    --------
    >>> sorted(p.name for p in plot_targets(["lyapunov_spectrum"], "figs", "svg", "s_").values())
    ['s_lyapunov_spectrum.svg', 's_summary.svg']
    """
    return {n: Path(out_dir) / f"{stem}{n}.{fmt}" for n in [*names, "summary"]}


def write_plots(ds, out_dir, fmt: str = "png", overwrite: bool = False, stem: str = "", written=None) -> list[Path]:
    """One figure per available plot plus ``summary``; returns the paths written.

    Every target is checked (``rnnjac._io.check_outputs``) and every figure drawn before the first
    file is written, so a refusal or a plotting error writes nothing; each file is written atomically.
    Paths are appended to ``written`` (a list) as they land.

    Examples
    --------
    >>> import tempfile, torch, rnnjac
    >>> ds = rnnjac.spectra(torch.nn.GRU(2, 3, batch_first=True), torch.randn(1, 6, 2))
    >>> paths = write_plots(ds, tempfile.mkdtemp(), "svg", stem="s_")
    >>> paths[-1].name
    's_summary.svg'
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from . import _io, plot

    names = plot.available(ds)
    if not names:
        raise ValueError("nothing to plot: the file has no spectra variables")
    targets = plot_targets(names, out_dir, fmt, stem)
    _io.check_outputs(list(targets.values()), overwrite=overwrite)
    figures = {}
    try:
        for name in names:
            figures[name] = plot.PLOTS[name](ds).figure
        figures["summary"] = plot.summary(ds)
        written = [] if written is None else written
        return [
            _write(_io.save_figure, figures[name], t, overwrite=overwrite, written=written)
            for name, t in targets.items()
        ]
    finally:
        for fig in figures.values():
            plt.close(fig)


# ----------------------------------------------------------------------------- commands
def _spectra_options(args):
    """The one :class:`~rnnjac._options.SpectraOptions` of ``rnnjac analyze``, validated before any work."""
    from ._options import SpectraOptions

    return SpectraOptions(
        k=args.k,
        warmup=args.warmup,
        tangent_warmup=args.tangent_warmup,
        reortho_every=args.reortho_every,
        eigenvalues=args.eigenvalues,
        end_to_end=args.end_to_end,
        singular_values=not args.no_singular_values,
        lyapunov=not args.no_lyapunov,
        local_lyapunov=args.local,
        keep_states=args.keep_states,
        state=args.state,
        method=args.method,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
    )


def cmd_analyze(args, argv) -> int:
    from . import _io
    from ._pipeline import analyze_checkpoint, check_device

    inputs = _input_spec(args)
    check_device(args.device)
    options = _spectra_options(args)
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"workers must be an integer >= 1; got {args.workers}")
    paths = _expand(args.checkpoints)
    out = Path(args.out)
    sweep = len(paths) > 1 or args.scheduler or args.workers
    # a sweep resumes or extends an existing output of its own configuration (analyze_checkpoints decides);
    # it must still be a file rnnjac wrote, of the right kind
    exists = os.path.lexists(out)
    _io.check_output(out, overwrite=args.overwrite or bool(sweep and exists))
    if sweep:
        from ._sweeps import analyze_checkpoints

        ds = analyze_checkpoints(
            paths,
            inputs=inputs,
            options=options,
            out=out,
            overwrite=args.overwrite,
            load_kwargs=_load_kwargs(args),
            scheduler=args.scheduler,
            workers=args.workers,
            command=_command_line(argv),
            progress=not args.quiet,
        )
        print(f"wrote {out} ({ds.sizes.get('checkpoint', 0)} checkpoints)")
        return 0
    ds = analyze_checkpoint(
        paths[0], inputs, options, load_kwargs=_load_kwargs(args), progress=not args.quiet, command=_command_line(argv)
    )
    _write(_io.save, ds, out, overwrite=args.overwrite, written=args.written)
    print(f"wrote {out}: {', '.join(ds.data_vars)}")
    if "lyapunov_exponents" in ds:
        top = ds.lyapunov_exponents.median("batch").values[:3]
        print("top Lyapunov exponents (median over batch, nats/step): " + ", ".join(f"{v:+.4f}" for v in top))
    return 0


def _verify_report(ds, quiet: bool) -> None:
    a = ds.attrs
    result = "PASS" if a["passed"] else "FAIL"
    abs_err, rel_err = float(ds.fd_max_abs_error.max()), float(ds.fd_max_rel_error.max())
    if quiet:
        print(f"{result}: max abs err {abs_err:.2e}, max rel err {rel_err:.2e}, rtol/atol {a['rtol']:g}/{a['atol']:g}")
    else:
        row = [a["architecture"], a["method"], a["mode"], a["dtype"], f"{abs_err:.2e}", f"{rel_err:.2e}"]
        row += [f"{a['rtol']:g}/{a['atol']:g}", result]
        headers = ["architecture", "method", "mode", "dtype", "max abs err", "max rel err", "rtol/atol", "result"]
        _print_table([row], headers)
    if not a["passed"]:
        print(
            f"worst entry: sample {a['worst_batch']}, step t={a['worst_time']}, {a['worst_block']} "
            f"(error {a['worst_tolerance_ratio']:.3g}x the tolerance)"
        )


def cmd_verify(args, argv) -> int:
    import torch

    from . import _io
    from ._checkpoints import checkpoint_info, load_checkpoint, sha256
    from ._dynamics import as_dynamics
    from ._pipeline import DTYPES, check_device, make_h0, make_inputs
    from ._verify import verify

    spec = _input_spec(args)
    device = check_device(args.device)
    if args.out:
        _io.check_output(args.out, overwrite=args.overwrite)
    digest = sha256(args.checkpoint) if args.out else ""
    module = load_checkpoint(args.checkpoint, **_load_kwargs(args))
    dtype = DTYPES[args.dtype] if args.dtype else next(module.parameters()).dtype
    module = module.to(device=device, dtype=dtype)
    x = make_inputs(spec, checkpoint_info(module)["input_size"], dtype)
    h0 = make_h0(spec, as_dynamics(module).state_size, x.shape[0], dtype)
    ds = verify(
        module,
        x.to(device),
        None if h0 is None else h0.to(device),
        state=args.state,
        method=args.method,
        eps=args.eps,
        rtol=args.rtol,
        atol=args.atol,
        directions=args.directions,
        generator=torch.Generator().manual_seed(args.seed),
    )
    _verify_report(ds, args.quiet)
    if args.out:
        ds.attrs.update(
            checkpoint=str(args.checkpoint),
            checkpoint_sha256=digest,
            inputs=spec.describe(),
            command=_command_line(argv),
        )
        _write(_io.save, ds, args.out, overwrite=args.overwrite, written=args.written)
    return 0 if ds.attrs["passed"] else 1


def cmd_plot(args, argv) -> int:
    ds = _open_spectra(args.spectra)
    stem = Path(args.spectra).stem + "_"
    with _output_folder(Path(args.out)):
        write_plots(ds, args.out, args.format, args.overwrite, stem=stem, written=args.written)
    for p in args.written:
        print(p)
    return 0


def cmd_info(args, argv) -> int:
    path = Path(args.path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix.lower() in (".nc", ".zarr"):
        from ._datasets import SUMMARY_ATTRS

        ds = _open_spectra(path)
        print(f"spectra file {_printable(path)}")
        print("dims: " + ", ".join(f"{_printable(k)}={v}" for k, v in ds.sizes.items()))
        for name, var in ds.data_vars.items():
            desc = f"{var.attrs.get('long_name', '')} [{var.attrs.get('units', '')}]"
            print(f"  {_printable(name)}{var.dims}: {_printable(desc)}")
        for k in SUMMARY_ATTRS:
            if k in ds.attrs:
                print(f"{k}: {_printable(ds.attrs[k])}")
        return 0
    from ._checkpoints import inspect_checkpoint

    info = inspect_checkpoint(path, prefix=args.prefix, unsafe=args.unsafe)
    print(f"checkpoint {_printable(path)}")
    for k in ("arch", "input_size", "hidden_size", "num_layers", "proj_size", "bias", "prefix"):
        print(f"{k}: {_printable(repr(info[k]) if k == 'prefix' else info[k])}")
    if info["arch"] == "rnn":
        print(f"nonlinearity: {_printable(info['nonlinearity'])} ({_printable(info['nonlinearity_source'])})")
    if info["training_step"] is not None:
        print(f"training_step: {info['training_step']}")
    for k, v in sorted(info["metadata"].items()):
        print(f"metadata.{_printable(k)}: {_printable(v)}")
    return 0


DEMO_CHECKPOINT = "flipflop_gru.safetensors"
#: the fields of the demo's :class:`~rnnjac._options.SpectraOptions` (a dict: building it imports torch)
DEMO_OPTIONS = {
    "eigenvalues": True,
    "end_to_end": True,
    "local_lyapunov": True,
    "warmup": 20,
    "tangent_warmup": 20,
    "seed": 0,
}


def _demo_figures(model, x, options) -> list[str]:
    """The plots the demo's Dataset has, from a tiny run with the same options (nothing is written)."""
    from . import plot
    from ._spectra import spectra

    steps = options.warmup + options.tangent_warmup + 2
    return plot.available(spectra(model, x[:1, :steps], options=options))


def cmd_demo(args, argv) -> int:
    import time
    from importlib.resources import files

    import torch

    from . import _io
    from ._checkpoints import checkpoint_info, load_checkpoint, sha256
    from ._options import SpectraOptions
    from ._spectra import spectra
    from ._verify import verify
    from .tasks import flipflop

    t_start = time.time()
    say = (lambda *a: None) if args.quiet else print
    out = Path(args.out)
    ckpt = str(files("rnnjac") / "data" / DEMO_CHECKPOINT)
    with _output_folder(out):
        spectra_path = out / "spectra.nc"
        model = load_checkpoint(ckpt)
        model64 = model.double()
        x, _ = flipflop(8, 400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        options = SpectraOptions(**DEMO_OPTIONS)
        figures = plot_targets(_demo_figures(model64, x, options), out, "png")
        _io.check_outputs([spectra_path, *figures.values()], overwrite=args.overwrite)
        info = checkpoint_info(model)
        meta = info["metadata"]
        say(
            f"1/4 loaded the bundled checkpoint: GRU, input {info['input_size']}, hidden {info['hidden_size']}, "
            f"trained on the {meta.get('task', 'flip-flop')} ({meta.get('step', '?')} steps)"
        )
        ds_v = verify(model64, x[:2, :40])
        say(
            f"2/4 verified closed-form Jacobians against float64 finite differences: "
            f"max abs error {float(ds_v.fd_max_abs_error.max()):.1e} -> {'PASS' if ds_v.attrs['passed'] else 'FAIL'}"
        )
        attrs = {
            "checkpoint": f"rnnjac/data/{DEMO_CHECKPOINT}",
            "checkpoint_sha256": sha256(ckpt),
            "command": _command_line(argv),
            "inputs": "3-bit flip-flop trials, batch 8, steps 400, seed 0",
        }
        ds = spectra(model64, x, options=options, attrs=attrs, progress=not args.quiet)
        _write(_io.save, ds, spectra_path, overwrite=args.overwrite, written=args.written)
        lam = ds.lyapunov_exponents.median("batch").values
        say(
            f"3/4 spectra -> {spectra_path}: top exponents {', '.join(f'{v:+.3f}' for v in lam[:4])} nats/step, "
            f"Kaplan-Yorke dimension {float(ds.kaplan_yorke_dimension.median()):.2f}"
        )
        written = write_plots(ds, out, "png", overwrite=args.overwrite, written=args.written)
    say(f"4/4 figures -> {', '.join(str(p) for p in written)}")
    print(f"done in {time.time() - t_start:.1f} s: wrote {spectra_path} and {len(written)} figures in {out}")
    return 0


# ----------------------------------------------------------------------------- entry point
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


@contextmanager
def _scoped_output(verbose: bool):
    """During one command: rnnjac's log lines and warnings as one line each on stderr, in CLI terms.

    Scoped (a handler on the ``rnnjac`` logger and ``warnings.showwarning`` inside
    ``warnings.catch_warnings``), so nothing process-wide changes; other libraries' warnings pass through.
    """

    class Formatter(logging.Formatter):
        def format(self, record):
            return "rnnjac: " + cli_message(record.getMessage())

    from .errors import RnnjacWarning

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
