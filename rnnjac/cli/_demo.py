"""``rnnjac demo``: the whole pipeline on the flip-flop GRU shipped with rnnjac."""

from __future__ import annotations

import warnings
from pathlib import Path

from ._messages import _symbols, exponent_summary
from ._output import _command_line, _output_folder, _write, write_plots

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
    from dataclasses import replace

    from .. import plot
    from .._spectra import spectra
    from ..errors import ConvergenceWarning

    # "auto" transients and QR intervals are chosen from the run: the tiny run takes none (same variables, same plots)
    fixed = {name: 0 for name in ("warmup", "tangent_warmup") if getattr(options, name) == "auto"}
    if options.reortho_every == "auto":
        fixed["reortho_every"] = 1
    options = replace(options, **fixed)
    steps = options.warmup + options.tangent_warmup + 2
    with warnings.catch_warnings():  # two counted steps cannot converge; the real run warns where it matters
        warnings.simplefilter("ignore", ConvergenceWarning)
        return plot.available(spectra(model, x[:1, :steps], options=options))


#: the demo's fixed-point search: initial states drawn from its own trajectories
DEMO_FIXED_POINTS = {"n_initial": 256, "seed": 0}


def _plot_targets(*args):
    """:func:`rnnjac.cli.plot_targets`, looked up on the package at call time (tests replace it there)."""
    from .. import cli

    return cli.plot_targets(*args)


def _demo_fixed_points(model, x, path: Path, figure: Path, args, say) -> None:
    """Step 4: fixed points from 256 states of the demo's trajectories, their file and their figure."""
    import torch

    from .. import _io, plot
    from .._fixed_points import fixed_points
    from .._jacobians import trajectory
    from ._fixed import fixed_point_counts

    states = trajectory(model, x)
    g = torch.Generator().manual_seed(DEMO_FIXED_POINTS["seed"])
    ds = fixed_points(model, torch.zeros(x.shape[-1], dtype=x.dtype), states, n_initial=256, generator=g)
    ds.attrs["command"] = _command_line(args.argv)
    _write(_io.save, ds, path, overwrite=args.overwrite, written=args.written)
    ax = plot.fixed_points(ds, states[:, ::4])
    try:
        _write(_io.save_figure, ax.figure, figure, overwrite=args.overwrite, written=args.written)
    finally:
        import matplotlib.pyplot as plt

        plt.close(ax.figure)
    c = fixed_point_counts(ds)
    say(
        f"4/5 fixed points (zero input, {ds.attrs['n_initial']} initial states from the trajectories) -> {path}: "
        f"{c['stable']} stable, {c['unstable']} unstable (saddles), {c['slow']} slow; figure {figure}"
    )


def cmd_demo(args, argv) -> int:
    """Load, verify, analyse, find fixed points and plot the bundled flip-flop GRU into ``args.out``."""
    import time
    from importlib.resources import files

    import torch

    from .. import _io
    from .._checkpoints import checkpoint_info, load_checkpoint, sha256
    from .._options import SpectraOptions
    from .._spectra import spectra
    from .._verify import verify
    from ..tasks import flipflop

    t_start = time.time()
    say = (lambda *a: None) if args.quiet else print
    out = Path(args.out)
    ckpt = str(files("rnnjac") / "data" / DEMO_CHECKPOINT)
    args.argv = argv
    with _output_folder(out):
        spectra_path, fp_path, fp_figure = out / "spectra.nc", out / "fixed_points.nc", out / "fixed_points.png"
        model = load_checkpoint(ckpt)
        model64 = model.double()
        x, _ = flipflop(8, 400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        options = SpectraOptions(**DEMO_OPTIONS)
        figures = _plot_targets(_demo_figures(model64, x, options), out, "png")
        _io.check_outputs([spectra_path, fp_path, fp_figure, *figures.values()], overwrite=args.overwrite)
        info = checkpoint_info(model)
        meta = info["metadata"]
        say(
            f"1/5 loaded the bundled checkpoint: GRU, input {info['input_size']}, hidden {info['hidden_size']}, "
            f"trained on the {meta.get('task', 'flip-flop')} ({meta.get('step', '?')} steps)"
        )
        ds_v = verify(model64, x[:2, :40])
        say(
            f"2/5 verified closed-form Jacobians against float64 finite differences: "
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
        say(f"3/5 spectra -> {spectra_path}: {exponent_summary(ds, n=4, digits=3)}, {_dimension_summary(ds)}")
        _demo_fixed_points(model64, x, fp_path, fp_figure, args, say)
        written = write_plots(ds, out, "png", overwrite=args.overwrite, written=args.written)
    say(f"5/5 figures -> {', '.join(str(p) for p in written)}")
    n_figures = len(written) + 1
    print(f"done in {time.time() - t_start:.1f} s: wrote {spectra_path}, {fp_path} and {n_figures} figures in {out}")
    return 0


def _dimension_summary(ds) -> str:
    """``Kaplan-Yorke dimension 2.31 ± 0.05`` (mean ± interval half-width when present, else the batch median)."""
    if "kaplan_yorke_dimension_bounds" not in ds:
        return f"Kaplan-Yorke dimension {float(ds.kaplan_yorke_dimension.median()):.2f}"
    b = ds.kaplan_yorke_dimension_bounds
    half = float(b.sel(bound="upper") - b.sel(bound="lower")) / 2
    return f"Kaplan-Yorke dimension {float(ds.kaplan_yorke_dimension_mean):.2f} {_symbols()[1]} {half:.2f}"
