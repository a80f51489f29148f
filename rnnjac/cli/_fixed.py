"""``rnnjac fixed-points``: fixed and slow points of a checkpoint's recurrent module under constant input."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ._output import _command_line, _output_folder, _print_table, _write, plot_targets, write_plots

#: the figures of a fixed-point Dataset with at least one point (``rnnjac.plot.available``), plus a summary
FIGURES = ("fixed_points", "fixed_point_eigenvalues")


def fixed_point_counts(ds) -> dict[str, int]:
    """``{"stable", "unstable", "slow"}``: stable and unstable (saddle) fixed points, and slow points.

    Examples
    --------
    >>> import xarray as xr
    >>> ds = xr.Dataset({"is_fixed_point": ("fixed_point", [1, 1, 0]), "stable": ("fixed_point", [1, 0, 1])})
    >>> fixed_point_counts(ds)
    {'stable': 1, 'unstable': 1, 'slow': 1}
    """
    fixed = ds["is_fixed_point"].values.astype(bool)
    stable = ds["stable"].values.astype(bool)
    return {
        "stable": int((fixed & stable).sum()),
        "unstable": int((fixed & ~stable).sum()),
        "slow": int((~fixed).sum()),
    }


def _constant_input(args):
    """The constant input ``x*``: ``(I,)``, ``(C, I)`` or None (zeros)."""
    import torch

    if args.inputs:
        from .._pipeline import load_array

        arr = load_array(args.inputs, key=args.inputs_key)
        if arr.ndim not in (1, 2):
            raise ValueError(f"the constant input in {args.inputs} must be (I,) or (C, I); got shape {arr.shape}")
        return torch.as_tensor(arr, dtype=torch.float64)
    if args.input_value:
        return torch.tensor(args.input_value, dtype=torch.float64)
    return None


def _initial_states(args, module, input_size: int):
    """States of ``B`` trajectories of ``T`` steps on seeded Gaussian inputs (``--from-trajectories``), or None."""
    if args.from_trajectories is None:
        return None
    import torch

    from .._jacobians import trajectory

    b, t = args.from_trajectories
    if b < 1 or t < 1:
        raise ValueError(f"--from-trajectories B T must be integers >= 1; got {b} {t}")
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(b, t, input_size, generator=g, dtype=torch.float64)
    return trajectory(module, x)


def _report(ds, quiet: bool) -> None:
    c = fixed_point_counts(ds)
    a = ds.attrs
    searches = int(a["n_initial"]) * int(a["n_conditions"])
    if not quiet:
        fixed = ds["is_fixed_point"].values.astype(bool)
        stable = ds["stable"].values.astype(bool)
        radius = ds["fixed_point_spectral_radius"].values
        rows = []
        for name, mask in (("stable", fixed & stable), ("unstable (saddles)", fixed & ~stable), ("slow", ~fixed)):
            r = radius[mask]
            rows.append([name, int(mask.sum()), f"{r.min():.4f} .. {r.max():.4f}" if r.size else "-"])
        _print_table(rows, ["points", "count", "spectral radius (min .. max)"])
    print(
        f"{c['stable']} stable, {c['unstable']} unstable (saddles), {c['slow']} slow; "
        f"{a['n_converged']} of {searches} searches converged (tol {a['tol']:g}, {a['method']})"
    )


def cmd_fixed_points(args, argv) -> int:
    """Check every output, search the fixed points, print the counts, write the Dataset and the figures."""
    import torch

    from .. import _io
    from .._checkpoints import checkpoint_info, load_checkpoint, sha256
    from .._fixed_points import fixed_points
    from .._pipeline import check_device, stage

    device = check_device(args.device)
    out = Path(args.out) if args.out else None
    stem = (out.stem if out else Path(args.checkpoint).stem + "_fixed_points") + "_"
    folder = _output_folder(Path(args.plot_dir)) if args.plot_dir else contextlib.nullcontext()
    with folder:
        targets = plot_targets(FIGURES, args.plot_dir, "png", stem) if args.plot_dir else {}
        if out:
            _io.check_output(out, overwrite=args.overwrite, kind="dataset")
        _io.check_outputs(list(targets.values()), overwrite=args.overwrite, kind="figure")
        load = {"arch": args.arch, "nonlinearity": args.nonlinearity, "prefix": args.prefix, "unsafe": args.unsafe}
        with stage(f"loading {args.checkpoint}"):
            module = load_checkpoint(args.checkpoint, **load).double()
        states = _initial_states(args, module, checkpoint_info(module)["input_size"])
        with stage(f"searching fixed points of {module} from {args.n_initial} initial states"):
            ds = fixed_points(
                module,
                _constant_input(args),
                states,
                n_initial=args.n_initial,
                noise=args.noise,
                method=args.method,
                tol=args.tol,
                max_iter=args.max_iter,
                state=args.state,
                device=device,
                generator=torch.Generator().manual_seed(args.seed),
                progress=not args.quiet,
            )
        ds.attrs.update(
            checkpoint=str(args.checkpoint), checkpoint_sha256=sha256(args.checkpoint), command=_command_line(argv)
        )
        _report(ds, args.quiet)
        if out:
            _write(_io.save, ds, out, overwrite=args.overwrite, written=args.written)
        if args.plot_dir and ds.sizes["fixed_point"] == 0:
            print("no figures: no fixed point or slow point was found")
        elif args.plot_dir:
            write_plots(ds, args.plot_dir, "png", args.overwrite, stem=stem, written=args.written)
    for p in args.written:
        print(f"wrote {p}")
    return 0
