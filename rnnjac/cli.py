"""The ``rnnjac`` command line: analyze, verify, plot, info, demo.

Every error the user can fix is one line on stderr and exit status 2 (``--debug`` shows the
traceback); ``verify`` exits 1 when a check fails; an interrupt exits 130 with nothing written.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import shlex
import sys
import tempfile
import warnings
from pathlib import Path

from ._version import __version__

log = logging.getLogger(__name__)

EPILOG = "Docs and examples: README.md (section 'Command line')."


# ----------------------------------------------------------------------------- arguments
def _add_input_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inputs (a file, or generated)")
    g.add_argument("--inputs", metavar="FILE", help=".npy, .npz, .pt or .nc array of shape (B, T, I)")
    g.add_argument("--inputs-key", metavar="NAME", help="array name inside .npz/.pt/.nc files holding several")
    g.add_argument("--time-major", action="store_true", help="the file's array is (T, B, I)")
    g.add_argument("--batch", type=int, default=8, metavar="B", help="generated trials (default 8)")
    g.add_argument("--steps", type=int, default=200, metavar="T", help="generated steps (default 200)")
    g.add_argument(
        "--input-std", type=float, default=1.0, metavar="S", help="std of generated Gaussian inputs (default 1)"
    )
    g.add_argument("--autonomous", action="store_true", help="zero input (the autonomous system)")
    g.add_argument("--h0", choices=("zeros", "random"), default="zeros", help="initial state (default zeros)")
    g.add_argument("--seed", type=int, default=0, help="seed for generated inputs, h0 and tangents (default 0)")
    m = p.add_argument_group("model")
    m.add_argument("--arch", choices=("rnn", "gru", "lstm"), help="check the inferred architecture")
    m.add_argument(
        "--nonlinearity", choices=("tanh", "relu"), help="for nn.RNN checkpoints (not inferable; default tanh)"
    )
    m.add_argument("--prefix", help="which recurrent module when the checkpoint holds several (e.g. 'encoder.rnn.')")
    m.add_argument("--unsafe", action="store_true", help="allow a whole pickled module (runs code from the file!)")
    m.add_argument("--state", choices=("full", "h"), default="full", help="full state [h; c] or h only (default full)")
    m.add_argument("--method", choices=("auto", "analytic", "autograd"), default="auto")
    m.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    m.add_argument(
        "--dtype", choices=("float32", "float64"), help="analyse a converted copy (default: the checkpoint's)"
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnnjac",
        description="Recurrent networks as dynamical systems: Jacobians, their verification, spectra and plots.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"rnnjac {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser(
        "analyze",
        help="spectra of one checkpoint (or a sweep over many) -> netCDF/zarr",
        description="Compute per-step singular values, Lyapunov exponents (and optionally eigenvalues, "
        "end-to-end singular values) of checkpoints and write them to a file.",
        epilog=EPILOG,
    )
    a.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint file(s) or glob pattern(s)")
    a.add_argument("--out", required=True, help="output .nc (netCDF) or .zarr")
    a.add_argument("--overwrite", action="store_true", help="replace an existing output")
    a.add_argument("--k", type=int, help="number of Lyapunov exponents (default all D)")
    a.add_argument("--warmup", type=int, default=0, help="steps of state evolution before tangents (default 0)")
    a.add_argument("--tangent-warmup", type=int, default=0, help="tangent steps not counted (default 0)")
    a.add_argument("--reortho-every", type=int, default=1, help="steps between QR re-orthonormalisations (default 1)")
    a.add_argument("--eigenvalues", action="store_true", help="also per-step eigenvalues and spectral radius")
    a.add_argument("--end-to-end", action="store_true", help="also singular values of ds_t/ds_0")
    a.add_argument("--local", action="store_true", help="also per-step (local) Lyapunov exponents")
    a.add_argument("--keep-states", action="store_true", help="also store the states")
    a.add_argument("--no-singular-values", action="store_true", help="skip per-step singular values")
    a.add_argument("--no-lyapunov", action="store_true", help="skip Lyapunov exponents")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.add_argument("--scheduler", metavar="ADDRESS", help="sweeps: a dask.distributed scheduler address")
    a.add_argument("--workers", type=int, help="sweeps: start a local Dask cluster with N workers")
    _add_input_options(a)
    _add_common(a)
    a.set_defaults(func=cmd_analyze)

    v = sub.add_parser(
        "verify",
        help="check a checkpoint's Jacobians against float64 finite differences",
        description="Compare the Jacobians (closed form or autograd) with central finite differences in "
        "float64; print a table; exit 0 on pass, 1 on fail.",
        epilog=EPILOG,
    )
    v.add_argument("checkpoint", metavar="CKPT")
    v.add_argument("--eps", type=float, help="relative finite-difference step (default u^(1/3) = 6e-6)")
    v.add_argument("--rtol", type=float, default=1e-6)
    v.add_argument("--atol", type=float, default=1e-8)
    v.add_argument("--directions", type=int, help="directional check along this many random vectors (cheap for big D)")
    v.add_argument("--out", help="also write the verification Dataset (.nc)")
    v.add_argument("--overwrite", action="store_true")
    _add_input_options(v)
    _add_common(v)
    v.set_defaults(func=cmd_verify, batch=2, steps=20)

    p = sub.add_parser(
        "plot",
        help="figures of a spectra file",
        description="One figure per variable present, plus a summary panel.",
        epilog=EPILOG,
    )
    p.add_argument("spectra", metavar="SPECTRA", help="a file written by 'rnnjac analyze' (.nc or .zarr)")
    p.add_argument("--out", default=".", metavar="DIR", help="output folder (default: current)")
    p.add_argument("--format", choices=("png", "pdf", "svg"), default="png")
    p.add_argument("--overwrite", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_plot)

    i = sub.add_parser("info", help="describe a checkpoint or a spectra file", epilog=EPILOG)
    i.add_argument("path", metavar="PATH")
    i.add_argument("--prefix")
    i.add_argument("--unsafe", action="store_true")
    _add_common(i)
    i.set_defaults(func=cmd_info)

    d = sub.add_parser(
        "demo",
        help="the whole pipeline on the GRU flip-flop checkpoint shipped with rnnjac",
        description="Load the bundled 3-bit flip-flop GRU, verify its Jacobians, analyse its spectra "
        "and plot them into DIR.",
        epilog=EPILOG,
    )
    d.add_argument("--out", default="rnnjac-demo", metavar="DIR", help="output folder (default ./rnnjac-demo)")
    d.add_argument("--overwrite", action="store_true", help="replace files from an earlier demo run")
    _add_common(d)
    d.set_defaults(func=cmd_demo)
    return parser


# ----------------------------------------------------------------------------- helpers
def _input_spec(args):
    from .pipeline import InputSpec

    return InputSpec(
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


def _savefig(fig, path: Path, overwrite: bool) -> Path:
    """Atomic figure write (temp file + rename)."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=130)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_plots(ds, out_dir, fmt: str = "png", overwrite: bool = False, stem: str = "") -> list[Path]:
    """One figure per available plot plus ``summary``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from . import plot

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output folder {out_dir} is a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = plot.available(ds)
    targets = [out_dir / f"{stem}{n}.{fmt}" for n in [*names, "summary"]]
    if not overwrite:
        for t in targets:
            if t.exists():
                raise FileExistsError(f"{t} already exists; pass --overwrite to replace it")
    if not names:
        raise ValueError("nothing to plot: the file has no spectra variables")
    written = []
    for name, target in zip(names, targets, strict=False):
        ax = plot.PLOTS[name](ds)
        written.append(_savefig(ax.figure, target, overwrite))
        plt.close(ax.figure)
    fig = plot.summary(ds)
    written.append(_savefig(fig, targets[-1], overwrite))
    plt.close(fig)
    return written


# ----------------------------------------------------------------------------- commands
def cmd_analyze(args, argv) -> int:
    from .datasets import check_writable, save
    from .pipeline import SpectraOptions, analyze_checkpoint

    paths = _expand(args.checkpoints)
    out = Path(args.out)
    sweep = len(paths) > 1 or args.scheduler or args.workers
    if not sweep:
        check_writable(out, overwrite=args.overwrite)
    options = SpectraOptions(
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
    inputs = _input_spec(args)
    if sweep:
        from .sweeps import analyze_checkpoints

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
    save(ds, out, overwrite=args.overwrite)
    print(f"wrote {out}: {', '.join(ds.data_vars)}")
    if "lyapunov_exponents" in ds:
        top = ds.lyapunov_exponents.median("batch").values[:3]
        print("top Lyapunov exponents (median over batch, nats/step): " + ", ".join(f"{v:+.4f}" for v in top))
    return 0


def cmd_verify(args, argv) -> int:
    import torch

    from .checkpoints import checkpoint_info, load_checkpoint
    from .datasets import check_writable, save
    from .dynamics import as_dynamics
    from .pipeline import DTYPES, make_h0, make_inputs
    from .verify import verify

    if args.out:
        check_writable(args.out, overwrite=args.overwrite)
    module = load_checkpoint(args.checkpoint, **_load_kwargs(args))
    dtype = DTYPES[args.dtype] if args.dtype else next(module.parameters()).dtype
    module = module.to(dtype)
    spec = _input_spec(args)
    x = make_inputs(spec, checkpoint_info(module)["input_size"], dtype)
    h0 = make_h0(spec, as_dynamics(module).state_size, x.shape[0], dtype)
    ds = verify(
        module,
        x,
        h0,
        state=args.state,
        method=args.method,
        eps=args.eps,
        rtol=args.rtol,
        atol=args.atol,
        directions=args.directions,
        generator=torch.Generator().manual_seed(args.seed),
    )
    a = ds.attrs
    rows = [
        [
            a["architecture"],
            a["method"],
            a["mode"],
            a["dtype"],
            f"{float(ds.fd_max_abs_error.max()):.2e}",
            f"{float(ds.fd_max_rel_error.max()):.2e}",
            f"{a['rtol']:g}/{a['atol']:g}",
            "PASS" if a["passed"] else "FAIL",
        ]
    ]
    _print_table(rows, ["architecture", "method", "mode", "dtype", "max abs err", "max rel err", "rtol/atol", "result"])
    if not a["passed"]:
        print(
            f"worst entry: sample {a['worst_batch']}, step t={a['worst_time']}, {a['worst_block']} "
            f"(error {a['worst_tolerance_ratio']:.3g}x the tolerance)"
        )
    if args.out:
        ds.attrs["command"] = _command_line(argv)
        save(ds, args.out, overwrite=args.overwrite)
    return 0 if a["passed"] else 1


def cmd_plot(args, argv) -> int:
    from .datasets import open_dataset

    ds = open_dataset(args.spectra)
    stem = Path(args.spectra).stem + "_"
    written = write_plots(ds, args.out, args.format, args.overwrite, stem=stem)
    for p in written:
        print(p)
    return 0


def cmd_info(args, argv) -> int:
    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix in (".nc", ".zarr"):
        from .datasets import SUMMARY_ATTRS, open_dataset

        ds = open_dataset(path)
        print(f"spectra file {path}")
        print("dims: " + ", ".join(f"{k}={v}" for k, v in ds.sizes.items()))
        for name, var in ds.data_vars.items():
            print(f"  {name}{var.dims}: {var.attrs.get('long_name', '')} [{var.attrs.get('units', '')}]")
        for k in SUMMARY_ATTRS:
            if k in ds.attrs:
                print(f"{k}: {ds.attrs[k]}")
        return 0
    from .checkpoints import inspect_checkpoint

    info = inspect_checkpoint(path, prefix=args.prefix, unsafe=args.unsafe)
    print(f"checkpoint {path}")
    for k in ("arch", "input_size", "hidden_size", "num_layers", "proj_size", "bias", "prefix"):
        print(f"{k}: {info[k]!r}" if k == "prefix" else f"{k}: {info[k]}")
    if info["arch"] == "rnn":
        print(f"nonlinearity: {info['nonlinearity']} ({info['nonlinearity_source']})")
    if info["training_step"] is not None:
        print(f"training_step: {info['training_step']}")
    for k, v in sorted(info["metadata"].items()):
        print(f"metadata.{k}: {v}")
    return 0


def cmd_demo(args, argv) -> int:
    import time
    from importlib.resources import files

    import torch

    from .checkpoints import checkpoint_info, load_checkpoint
    from .datasets import save
    from .spectra import spectra
    from .tasks import flipflop
    from .verify import verify

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spectra_path = out / "spectra.nc"
    if spectra_path.exists() and not args.overwrite:
        raise FileExistsError(f"{spectra_path} already exists (an earlier demo?); pass --overwrite to replace it")
    ckpt = files("rnnjac") / "data" / "flipflop_gru.safetensors"
    model = load_checkpoint(str(ckpt))
    info = checkpoint_info(model)
    meta = info["metadata"]
    print(
        f"1/4 loaded the bundled checkpoint: GRU, input {info['input_size']}, hidden {info['hidden_size']}, "
        f"trained on the {meta.get('task', 'flip-flop')} ({meta.get('step', '?')} steps)"
    )
    model64 = model.double()
    x, _ = flipflop(8, 400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ds_v = verify(model64, x[:2, :40])
    print(
        f"2/4 verified closed-form Jacobians against float64 finite differences: "
        f"max abs error {float(ds_v.fd_max_abs_error.max()):.1e} -> {'PASS' if ds_v.attrs['passed'] else 'FAIL'}"
    )
    ds = spectra(
        model64,
        x,
        eigenvalues=True,
        end_to_end=True,
        local_lyapunov=True,
        warmup=20,
        tangent_warmup=20,
        generator=torch.Generator().manual_seed(0),
        attrs={
            "checkpoint": "rnnjac/data/flipflop_gru.safetensors",
            "command": _command_line(argv),
            "inputs": "3-bit flip-flop trials, batch 8, steps 400, seed 0",
        },
    )
    save(ds, spectra_path, overwrite=args.overwrite)
    lam = ds.lyapunov_exponents.median("batch").values
    print(
        f"3/4 spectra -> {spectra_path}: top exponents {', '.join(f'{v:+.3f}' for v in lam[:4])} nats/step, "
        f"Kaplan-Yorke dimension {float(ds.kaplan_yorke_dimension.median()):.2f}"
    )
    written = write_plots(ds, out, "png", overwrite=args.overwrite)
    print(f"4/4 figures -> {', '.join(str(p) for p in written)}")
    print(f"done in {time.time() - t_start:.1f} s")
    return 0


# ----------------------------------------------------------------------------- entry point
def _configure_output(verbose: bool) -> None:
    """The package's own log lines and warnings as one line each on stderr (other libraries untouched)."""
    logger = logging.getLogger("rnnjac")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("rnnjac: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"rnnjac: warning: {message}\n"


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 verification failed, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_output(args.verbose)
    try:
        return args.func(args, argv)
    except KeyboardInterrupt:
        print("rnnjac: interrupted; no output was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): not an error of ours
        sys.stderr.close()
        return 0
    except Exception as err:  # noqa: BLE001 - every error becomes one line unless --debug
        if args.debug:
            raise
        known = (ValueError, TypeError, OSError, ImportError, LookupError)
        msg = " ".join(str(err).split()) or type(err).__name__
        if not isinstance(err, known):
            msg = f"{type(err).__name__}: {msg} (rerun with --debug for the traceback)"
        print(f"rnnjac: error: {msg}", file=sys.stderr)
        return 2
