"""Plots on the Agg backend: Axes returned, given axes used, labels with units, clear errors."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import pytest
from problems import Problem

import rnnjac
from rnnjac import plot

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def ds():
    p = Problem("gru", hidden=6)
    m, x = p.module(), p.inputs(batch=3, steps=40)
    return rnnjac.spectra(m, x, eigenvalues=True, end_to_end=True, local_lyapunov=True, warmup=5)


SINGLE = list(plot.PLOTS)  # every single-variable plot


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
