"""Plots on the Agg backend: Axes returned, given axes used, labels with units, clear errors."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import xarray as xr
from problems import Problem

import rnnjac
from rnnjac import plot

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def ds():
    p = Problem("gru", hidden=6)
    m, x = p.module(), p.inputs(batch=3, steps=40)
    ds = rnnjac.spectra(m, x, eigenvalues=True, end_to_end=True, local_lyapunov=True, warmup=5)
    return xr.merge([ds, rnnjac.sensitivity(m, x, max_lag=8)], combine_attrs="override")


SWEEP_ONLY = ["lyapunov_vs_training_step", "kaplan_yorke_vs_training_step"]  # curves over training
FIXED_POINT = ["fixed_points", "fixed_point_eigenvalues"]  # plots of a fixed-point dataset
SINGLE = [n for n in plot.PLOTS if n not in SWEEP_ONLY + FIXED_POINT]  # every plot of one model


@pytest.mark.parametrize("name", SINGLE)
def test_returns_axes_with_labels_and_units(ds, name):
    ax = getattr(plot, name)(ds)
    assert isinstance(ax, matplotlib.axes.Axes)
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    assert "[" in ax.get_xlabel() + ax.get_ylabel() or name in ("singular_value_heatmap",)  # units in brackets
    assert ax.has_data() or ax.images
    plt.close(ax.figure)


@pytest.mark.parametrize("name", SINGLE)
def test_draws_into_the_given_axes(ds, name):
    fig, ax = plt.subplots()
    assert getattr(plot, name)(ds, ax=ax) is ax
    assert len(plt.get_fignums()) == 1 or any(f is fig for f in map(plt.figure, plt.get_fignums()))
    plt.close("all")


def test_units_come_from_the_dataset(ds):
    ax = plot.lyapunov_spectrum(ds)
    assert ax.get_ylabel() == "Lyapunov exponents [nats/step]"
    ax2 = plot.end_to_end(ds)
    assert ax2.get_ylabel().endswith("[nats]") and ax2.get_xlabel() == "time t [step]"
    plt.close("all")


@pytest.mark.parametrize(
    "name,needs",
    [
        ("singular_values", "singular_values"),
        ("lyapunov_spectrum", "lyapunov_exponents"),
        ("lyapunov_convergence", "local_lyapunov"),
        ("eigenvalues", "eigenvalues_real"),
        ("end_to_end", "end_to_end_log_singular_values"),
        ("singular_value_heatmap", "singular_values"),
    ],
)
def test_missing_variable_is_a_clear_error(ds, name, needs):
    with pytest.raises(ValueError, match=f"needs the variable '{needs}'.*it has: "):
        getattr(plot, name)(ds.drop_vars(needs))


def test_compare_and_summary(ds):
    other = ds.copy()
    other["lyapunov_exponents"] = ds.lyapunov_exponents - 0.1
    ax = plot.compare([ds, other], ["a", "b"])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    ax_sv = plot.compare([ds, other], ["a", "b"], "singular_values")
    assert ax_sv.get_yscale() == "log"
    with pytest.raises(ValueError, match="one label per dataset"):
        plot.compare([ds], ["a", "b"])
    fig = plot.summary(ds)
    assert sum(a.get_visible() for a in fig.axes if a.get_label() != "<colorbar>") >= 6
    with pytest.raises(ValueError, match="nothing to plot"):
        plot.summary(ds[["kaplan_yorke_dimension"]])
    plt.close("all")


def test_many_eigenvalues_use_a_density(ds):
    ax = plot.eigenvalues(ds, max_points=10)
    assert ax.collections and type(ax.collections[0]).__name__ == "PolyCollection"  # hexbin
    plt.close("all")


# ----------------------------------------------------------------------------- sweeps
STEPS = (100, 200, 300)
PER_CHECKPOINT = ["singular_values", "lyapunov_spectrum"]  # one line per checkpoint
ONE_CHECKPOINT = ["singular_value_heatmap", "lyapunov_convergence", "eigenvalues", "end_to_end"]


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory):
    """A real sweep: three tiny GRU checkpoints (recurrent gain 1, 4, 8) through analyze_checkpoints."""
    import torch
    from torch import nn

    from rnnjac._pipeline import InputSpec, SpectraOptions

    folder = tmp_path_factory.mktemp("sweep")
    paths = []
    for step, gain in zip((300, 100, 200), (8.0, 1.0, 4.0), strict=True):  # listed out of order on purpose
        torch.manual_seed(0)
        m = nn.GRU(2, 6)
        with torch.no_grad():
            m.weight_hh_l0.mul_(gain)
        paths.append(folder / f"run_step{step}.pt")
        torch.save({"state_dict": m.state_dict()}, paths[-1])
    options = SpectraOptions(warmup=10, eigenvalues=True, end_to_end=True, local_lyapunov=True, dtype="float64")
    out = folder / "sweep.nc"
    rnnjac.analyze_checkpoints(paths, inputs=InputSpec(batch=3, steps=30, seed=1), options=options, out=out)
    return out


@pytest.fixture(scope="module")
def sweep(sweep_file):
    ds = rnnjac.open_dataset(sweep_file).load()
    assert ds.sizes["checkpoint"] == 3 and list(ds.training_step.values) == list(STEPS)
    return ds


def _curves(ax):
    """The labelled data lines (reference lines such as axhline carry matplotlib's '_' labels)."""
    return [line for line in ax.lines if not line.get_label().startswith("_")]


def _no_rgb_images(fig):
    for a in fig.axes:
        for im in a.images:
            assert im.get_array().ndim == 2, "an array was drawn as an RGB(A) image"


def _drawn(ax):
    """The data of every line, image and collection on ``ax``."""
    data = [np.asarray(line.get_ydata()) for line in ax.lines] + [np.asarray(im.get_array()) for im in ax.images]
    for c in ax.collections:
        data += [np.asarray(c.get_offsets())] + [path.vertices for path in c.get_paths()]
    return data


def _median_per_checkpoint(sweep, var):
    vals = sweep[var].transpose("checkpoint", "batch", ...).values
    return np.median(vals.reshape(vals.shape[0], -1, vals.shape[-1]), axis=1)  # over batch (x time)


@pytest.mark.parametrize(
    "name,var", [("singular_values", "singular_values"), ("lyapunov_spectrum", "lyapunov_exponents")]
)
def test_sweep_one_line_per_checkpoint_coloured_by_step(sweep, name, var):
    ax = plot.PLOTS[name](sweep)
    lines = _curves(ax)
    assert len(lines) == 3
    want = _median_per_checkpoint(sweep, var)
    for line, row in zip(lines, want, strict=True):
        np.testing.assert_array_equal(line.get_xdata(), np.arange(1, want.shape[1] + 1))
        np.testing.assert_allclose(line.get_ydata(), row, rtol=1e-12)
    cmap = matplotlib.colormaps["viridis"]
    assert np.allclose(lines[0].get_color(), cmap(0.0)) and np.allclose(lines[-1].get_color(), cmap(1.0))
    colorbars = [a for a in ax.figure.axes if a is not ax]
    assert len(colorbars) == 1 and colorbars[0].get_ylabel() == "training step [step]"
    assert "index i" in ax.get_xlabel() and "[" in ax.get_ylabel()
    _no_rgb_images(ax.figure)
    plt.close("all")


def test_sweep_over_training_step(sweep):
    ax = plot.lyapunov_vs_training_step(sweep, indices=[0, 2])
    lines = _curves(ax)
    assert [line.get_label() for line in lines] == ["λ_1", "λ_3"]
    le = sweep.lyapunov_exponents.transpose("checkpoint", "batch", "le_index").values
    for line, i in zip(lines, (0, 2), strict=True):
        np.testing.assert_array_equal(line.get_xdata(), STEPS)
        np.testing.assert_allclose(line.get_ydata(), np.median(le[:, :, i], axis=1), rtol=1e-12)
    assert ax.get_xlabel() == "training step [step]" and ax.get_ylabel() == "Lyapunov exponents [nats/step]"
    ax2 = plot.kaplan_yorke_vs_training_step(sweep)
    (line,) = _curves(ax2)
    np.testing.assert_allclose(line.get_ydata(), sweep.kaplan_yorke_dimension.median("batch").values)
    assert line.get_ydata()[-1] > 0  # gain 8 is chaotic in this sample: the curve is not trivially 0
    assert ax2.get_xlabel() == "training step [step]" and ax2.get_ylabel().endswith("[1]")
    with pytest.raises(ValueError, match=r"indices=\[9\] are out of range"):
        plot.lyapunov_vs_training_step(sweep, indices=[9])
    plt.close("all")


@pytest.mark.parametrize("name", SWEEP_ONLY)
def test_curves_over_training_need_a_sweep(ds, name):
    with pytest.raises(ValueError, match="needs a sweep: a dataset with a 'checkpoint'"):
        plot.PLOTS[name](ds)
    assert name not in plot.available(ds)


@pytest.mark.parametrize("name", ONE_CHECKPOINT)
def test_one_checkpoint_plots_refuse_a_sweep_before_drawing(sweep, name):
    plt.close("all")
    with pytest.raises(ValueError, match=r"sweep of 3 \(dim 'checkpoint'\); pass checkpoint= a position 0\.\.2"):
        plot.PLOTS[name](sweep)
    assert not plt.get_fignums()  # refused before a figure was made


@pytest.mark.parametrize("name", ONE_CHECKPOINT + PER_CHECKPOINT)
def test_checkpoint_keyword_draws_that_checkpoint(sweep, name):
    """checkpoint= by position, path or file name gives the same figure as the row itself."""
    row = sweep.isel(checkpoint=1)
    path = str(sweep.checkpoint.values[1])
    axes = [
        plot.PLOTS[name](sweep, checkpoint=1),
        plot.PLOTS[name](sweep, checkpoint=path),
        plot.PLOTS[name](sweep, checkpoint="run_step200.pt"),
    ]
    alone = plot.PLOTS[name](row.drop_vars(["checkpoint", "training_step", "checkpoint_sha256"]))
    for ax in axes:
        assert "step 200" in ax.get_title()
        got, want = _drawn(ax), _drawn(alone)
        assert len(got) == len(want) > 0
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
        _no_rgb_images(ax.figure)
    plt.close("all")


def test_heatmap_of_one_checkpoint_is_its_median_over_batch(sweep):
    ax = plot.singular_value_heatmap(sweep, checkpoint=-1)
    (im,) = ax.images
    sv = sweep.singular_values.isel(checkpoint=-1).transpose("batch", "time", "sv_index").values
    np.testing.assert_allclose(im.get_array(), np.log10(np.median(sv, axis=0)).T, rtol=1e-12)
    plt.close("all")


def test_checkpoint_keyword_errors(ds, sweep):
    with pytest.raises(ValueError, match="out of range: the dataset has 3 checkpoints"):
        plot.lyapunov_spectrum(sweep, checkpoint=3)
    with pytest.raises(ValueError, match="names no checkpoint; expected a position 0..2 or one of"):
        plot.lyapunov_spectrum(sweep, checkpoint="nope.pt")
    with pytest.raises(ValueError, match="has no sweep dim"):
        plot.lyapunov_spectrum(ds, checkpoint=0)
    plt.close("all")


def test_available_lists_exactly_what_draws(ds, sweep):
    assert plot.available(sweep) == PER_CHECKPOINT + SWEEP_ONLY
    assert plot.available(ds) == SINGLE
    one = sweep.isel(checkpoint=[2])  # a sweep of one checkpoint is drawn as that checkpoint
    assert plot.available(one) == [n for n in SINGLE if n != "sensitivity"] + SWEEP_ONLY  # (no sensitivities)
    for data in (ds, sweep, one, sweep.swap_dims(checkpoint="training_step")):
        for name in plot.PLOTS:
            if name in plot.available(data):
                _no_rgb_images(plot.PLOTS[name](data).figure)
            else:
                with pytest.raises(ValueError):
                    plot.PLOTS[name](data)
            plt.close("all")


def test_plots_use_the_log_end_to_end_variable_only(ds):
    lean = ds.drop_vars("end_to_end_singular_values", errors="ignore")
    assert "end_to_end" in plot.available(lean)
    ax = plot.end_to_end(lean)
    assert _curves(ax)
    with pytest.raises(ValueError) as err:
        plot.end_to_end(ds.drop_vars("end_to_end_log_singular_values"))
    assert "end_to_end=True" in str(err.value) and "--" not in str(err.value) and "CLI" not in str(err.value)
    plt.close("all")


def test_training_step_dim_and_unknown_steps(sweep):
    by_step = sweep.swap_dims(checkpoint="training_step")
    assert len(_curves(plot.lyapunov_spectrum(by_step))) == 3
    np.testing.assert_array_equal(_curves(plot.lyapunov_vs_training_step(by_step))[0].get_xdata(), STEPS)
    assert "step 300" in plot.eigenvalues(by_step, checkpoint=2).get_title()
    unknown = sweep.assign_coords(training_step=("checkpoint", [-1, -1, -1]))
    ax = plot.lyapunov_vs_training_step(unknown)
    np.testing.assert_array_equal(_curves(ax)[0].get_xdata(), [0, 1, 2])
    assert ax.get_xlabel() == "checkpoint (position in the sweep)"
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"run_step{s}.pt" for s in STEPS]
    plt.close("all")


def test_compare_takes_checkpoints_not_sweeps(sweep):
    with pytest.raises(ValueError, match=r"datasets\[1\] is a sweep of 3 checkpoints"):
        plot.compare([sweep.isel(checkpoint=0), sweep], ["a", "b"])
    ax = plot.compare([sweep.isel(checkpoint=0), sweep.isel(checkpoint=[2])], ["first", "last"])
    want = _median_per_checkpoint(sweep, "lyapunov_exponents")
    for line, row in zip(_curves(ax), want[[0, 2]], strict=True):
        np.testing.assert_allclose(line.get_ydata(), row, rtol=1e-12)
    plt.close("all")


def test_summary_of_a_sweep(sweep):
    fig = plot.summary(sweep)
    panels = [a for a in fig.axes if a.get_visible() and a.get_title()]
    assert [a.get_title().split(" —")[0] for a in panels] == [
        "Lyapunov exponents over training",
        "Kaplan–Yorke dimension over training",
        "Singular values of J_t (median per checkpoint)",
        "Lyapunov spectrum (median per checkpoint)",
    ]
    assert "sweep of 3 checkpoints, training steps 100–300" in fig._suptitle.get_text()
    _no_rgb_images(fig)
    fig1 = plot.summary(sweep, checkpoint=0)
    assert sum(bool(a.get_title()) for a in fig1.axes) == len(SINGLE) - 1  # not the sensitivities
    plt.close("all")
    with pytest.raises(ValueError, match="nothing to plot: .*checkpoint="):
        plot.summary(sweep[["eigenvalues_real", "eigenvalues_imag"]])


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".nc", ".zarr"])  # .zarr: the README's sweep example
def test_cli_plot_on_a_sweep(sweep_file, sweep, tmp_path, suffix):
    from rnnjac.cli import main

    src = sweep_file if suffix == ".nc" else rnnjac.save(sweep, tmp_path / "sweep.zarr")
    out = tmp_path / "figures"
    assert main(["plot", str(src), "--out", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"sweep_{n}.png" for n in [*plot.available(sweep), "summary"])
    for p in out.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert plt.imread(p).ndim == 3  # decodes as an image


def test_minus_infinity_is_marked_not_dropped(sweep):
    """A lost direction (-inf exponent, zero singular value) gets a marker at the bottom edge, not a silent gap."""
    ds = sweep.copy(deep=True)
    ds["lyapunov_exponents"][dict(checkpoint=0)] = -np.inf  # every exponent of the first checkpoint
    ds["singular_values"][dict(checkpoint=2, sv_index=-1)] = 0.0
    ax = plot.lyapunov_spectrum(ds)
    (marks,) = [a for a in ax.lines if a.get_label().startswith("−∞")]
    np.testing.assert_array_equal(marks.get_xdata(), np.arange(1, ds.sizes["le_index"] + 1))
    assert np.allclose(marks.get_color(), matplotlib.colormaps["viridis"](0.0))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["−∞ at the bottom edge"]
    ax = plot.lyapunov_vs_training_step(ds, indices=[0])
    (marks,) = [a for a in ax.lines if a.get_label().startswith("−∞")]
    np.testing.assert_array_equal(marks.get_xdata(), [100])
    ax = plot.singular_values(ds)
    (marks,) = [a for a in ax.lines if a.get_label().startswith("−∞ (log of 0)")]
    np.testing.assert_array_equal(marks.get_xdata(), [ds.sizes["sv_index"]])
    assert np.isnan(_curves(ax)[2].get_ydata()[-1])  # the line itself stops before the lost point
    plt.close("all")


def test_convergence_keeps_minus_infinity_and_indices_are_checked_first(ds):
    """A -inf local exponent makes the running estimate -inf from then on (not -1.8e308 from nan_to_num)."""
    loc = ds.local_lyapunov.copy()
    loc[dict(le_index=-1, time=20)] = -np.inf  # every sample loses the last direction at t = 21
    ax = plot.lyapunov_convergence(ds.assign(local_lyapunov=loc), indices=[0, -1])
    first, last = _curves(ax)[:2]
    assert np.isfinite(first.get_ydata()[~np.isnan(first.get_ydata())]).all()
    assert np.isnan(last.get_ydata()[20:]).all() and np.isfinite(last.get_ydata()[10:20]).all()
    (marks,) = [a for a in ax.lines if a.get_label().startswith("−∞")]
    np.testing.assert_array_equal(marks.get_xdata(), ds.time.values[20:])
    plt.close("all")
    for name in ("lyapunov_convergence", "end_to_end"):
        with pytest.raises(ValueError, match=r"indices=\[99\] are out of range"):
            plot.PLOTS[name](ds, indices=[0, 99])
        assert not plt.get_fignums()


# ----------------------------------------------------------------------------- fixed points
@pytest.fixture(scope="module")
def fp():
    """Fixed and slow points of a 2-unit tanh RNN, W = [[2, .2], [.1, 2]]: stable corners, saddles, the origin."""
    import torch
    from torch import nn

    rnn = nn.RNN(1, 2, bias=False, batch_first=True).double()
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.tensor([[2.0, 0.2], [0.1, 2.0]], dtype=torch.float64))
    starts = 2.4 * torch.rand(40, 2, generator=torch.Generator().manual_seed(19), dtype=torch.float64) - 1.2
    ds = rnnjac.fixed_points(rnn, initial_states=starts)
    assert int(ds.stable.sum()) > 0 and int((ds.stable == 0).sum()) > 0
    return ds


def _pairwise(xy):
    return np.sort(np.linalg.norm(xy[:, None] - xy[None], axis=-1).ravel())


def test_fixed_point_plots_are_registered_and_available(fp, ds, sweep):
    assert plot.available(fp) == FIXED_POINT
    assert all(plot.PLOTS[n] is getattr(plot, n) for n in FIXED_POINT)
    assert not set(FIXED_POINT) & set(plot.available(ds) + plot.available(sweep))
    for name in plot.PLOTS:
        if name not in FIXED_POINT:
            with pytest.raises(ValueError, match="needs the variable"):
                plot.PLOTS[name](fp)
    with pytest.raises(ValueError, match="needs the variable 'fixed_point_states' of a fixed-point dataset"):
        plot.fixed_points(ds)
    with pytest.raises(ValueError, match=r"expects 'fixed_point_states' with dims \('fixed_point', 'unit'\)"):
        plot.fixed_points(fp.transpose("unit", "fixed_point", ...))
    empty = fp.isel(fixed_point=[])  # nothing to draw without trajectories
    assert plot.available(empty) == []
    with pytest.raises(ValueError, match="nothing to plot: .*no fixed or slow point"):
        plot.summary(empty)
    plt.close("all")


def test_summary_of_fixed_points_side_by_side(fp):
    fig = plot.summary(fp)
    panels = [a for a in fig.axes if a.get_visible() and a.get_title()]
    assert [a.get_title().split(" —")[0] for a in panels] == ["Fixed points", "Eigenvalues of J at fixed points"]
    left, right = (a.get_subplotspec() for a in panels)
    assert (left.rowspan, left.colspan, right.rowspan, right.colspan) == (range(1), range(1), range(1), range(1, 2))
    assert "fixed and slow points" in fig._suptitle.get_text()
    # PCA of 2-D states onto 2 components is a rotation/reflection: the distances between points are kept
    drawn = np.concatenate([c.get_offsets() for c in panels[0].collections])
    np.testing.assert_allclose(_pairwise(drawn), _pairwise(fp.fixed_point_states.values), atol=1e-9)
    # the eigenvalue panel shows the eigenvalues of the fixed (not the slow) points, as stored
    fixed = fp.is_fixed_point.values == 1
    eig = (fp.fixed_point_eigenvalues_real.values + 1j * fp.fixed_point_eigenvalues_imag.values)[fixed].ravel()
    xy = np.concatenate([c.get_offsets() for c in panels[1].collections])
    np.testing.assert_allclose(np.sort_complex(xy[:, 0] + 1j * xy[:, 1]), np.sort_complex(eig), atol=1e-12)
    plt.close("all")


def test_cli_plot_on_a_fixed_point_file(fp, tmp_path):
    from rnnjac.cli import main

    src = rnnjac.save(fp, tmp_path / "fp.nc")
    out = tmp_path / "figures"
    assert main(["plot", str(src), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"fp_{n}.png" for n in [*FIXED_POINT, "summary"])
    for p in out.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = plt.imread(p)
        assert img.ndim == 3 and img[..., :3].std() > 0.01  # decodes, and is not a blank canvas
    summary = plt.imread(out / "fp_summary.png")
    assert summary.shape[1] > 1.5 * summary.shape[0]  # the two plots side by side
    plt.close("all")


def test_fixed_points_of_a_one_unit_model_are_drawn_on_a_line():
    """A one-unit state has one principal component: the points lie on the x axis at their own values."""
    import torch

    w = 1.7
    cell = rnnjac.CustomCell(
        lambda s, x: torch.tanh(w * s + x), lambda s, x: torch.diag_embed(w * (1 - torch.tanh(w * s + x) ** 2))
    )
    starts = torch.linspace(-2, 2, 21, dtype=torch.float64).unsqueeze(1)
    ds = rnnjac.fixed_points(cell, torch.zeros(1, dtype=torch.float64), starts)
    assert "fixed_points" in rnnjac.plot.available(ds)
    ax = rnnjac.plot.fixed_points(ds)
    drawn = np.concatenate([c.get_offsets()[:, 0] for c in ax.collections])
    centred = np.sort(ds.fixed_point_states.values[:, 0] - ds.fixed_point_states.values[:, 0].mean())
    np.testing.assert_allclose(np.sort(np.abs(drawn)), np.sort(np.abs(centred)), atol=1e-9)
    plt.close(ax.figure)
