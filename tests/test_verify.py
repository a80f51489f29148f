"""Verification: finite differences catch wrong Jacobians and pass right ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from problems import PROBLEMS, Problem, ids

import rnnjac
from rnnjac._cells import ARCHITECTURES
from rnnjac._datasets import validate
from rnnjac._dynamics import as_dynamics


@pytest.mark.parametrize("problem", PROBLEMS, ids=ids(PROBLEMS))
def test_every_architecture_passes_in_float64(problem):
    m, x = problem.module(), problem.inputs()
    ds = rnnjac.verify(m, x)
    validate(ds)
    assert ds.attrs["passed"] == 1, ds.attrs["worst_block"]
    assert float(ds.fd_max_abs_error.max()) < 1e-8
    assert ds.fd_max_abs_error.dims == ("batch", "time")


@pytest.mark.parametrize("method", ["analytic", "autograd"])
@pytest.mark.parametrize("state", ["full", "h"])
def test_directional_mode_passes(method, state):
    m, x = Problem("lstm", layers=2, proj=2).module(), Problem("lstm").inputs(steps=5)
    ds = rnnjac.verify(m, x, method=method, state=state, directions=3, generator=torch.Generator().manual_seed(0))
    assert ds.attrs["passed"] == 1 and ds.attrs["mode"] == "directional"


def test_fd_jacobians_match_closed_form_and_leave_model_alone():
    p = Problem("gru", layers=2, dtype=torch.float32)
    m, x = p.module(), p.inputs()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fd = rnnjac.finite_difference_jacobians(m, x)
    assert fd.dtype == torch.float64
    for k, v in m.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k])
    # the float64 closed form at the same (float32-recorded) states
    states = rnnjac.trajectory(m, x).double()
    dyn = as_dynamics(m).to(dtype=torch.float64)
    lin = dyn.linearize(states[:, :-1].reshape(-1, states.shape[-1]), x.double().reshape(-1, 3))
    want = lin.materialize().reshape(fd.shape)
    torch.testing.assert_close(fd, want, rtol=0, atol=1e-9)


def _wrong_cell(module, corrupt):
    """A CustomCell with the module's exact step and a corrupted copy of its closed-form Jacobian."""
    dyn = as_dynamics(module)

    def jac(s, x):
        return corrupt(dyn.linearize(s, x).materialize().clone())

    return rnnjac.CustomCell(dyn.step, jacobian=jac, parameters=dyn.tensors())


def test_sign_flip_in_one_gate_is_caught(monkeypatch):
    m, x = Problem("gru").module(), Problem("gru").inputs()
    gru = ARCHITECTURES["gru"]
    original = gru.linearize

    def flipped(*args, **kwargs):
        h, c, coef = original(*args, **kwargs)
        coef["a_z"] = -coef["a_z"]
        return h, c, coef

    monkeypatch.setattr(gru, "linearize", flipped)
    ds = rnnjac.verify(m, x)
    assert ds.attrs["passed"] == 0
    assert float(ds.fd_max_abs_error.max()) > 1e-3


def test_transposed_block_is_caught():
    m, x = Problem("lstm").module(), Problem("lstm").inputs()
    cell = _wrong_cell(m, _transpose_hh)
    ds = rnnjac.verify(cell, x, torch.zeros(2, 10, dtype=torch.float64))
    assert ds.attrs["passed"] == 0


def _transpose_hh(j):
    j[..., :5, :5] = j[..., :5, :5].transpose(-1, -2).clone()
    return j


def test_missing_cross_layer_block_is_caught():
    p = Problem("rnn_tanh", layers=2)
    m, x = p.module(), p.inputs()

    def drop(j):
        j[..., 5:, :5] = 0
        return j

    ds = rnnjac.verify(_wrong_cell(m, drop), x, torch.zeros(2, 10, dtype=torch.float64))
    assert ds.attrs["passed"] == 0
    # a custom cell's state is one flat layer, so the block is located by row/column index
    assert ds.attrs["worst_row"] >= 5 and ds.attrs["worst_col"] < 5


def test_report_points_at_worst_step_sample_and_block():
    p = Problem("lstm", layers=2)
    m, x = p.module(), p.inputs(batch=3, steps=6)

    def corrupt(j):
        if j.shape[0] != 18:  # the shape check on s_0 alone
            return j
        j = j.reshape(3, 6, 20, 20)
        j[2, 4, 17, 3] += 0.5  # sample 2, step t=5, row: layer 1 c[2], column: layer 0 h[3]
        return j.reshape(-1, 20, 20)

    ds = rnnjac.verify(_wrong_cell(m, corrupt), x, torch.zeros(3, 20, dtype=torch.float64))
    a = ds.attrs
    assert (a["passed"], a["worst_batch"], a["worst_time"], a["worst_row"], a["worst_col"]) == (0, 2, 5, 17, 3)
    assert a["worst_block"] == "row layer 0 h[17], column layer 0 h[3]"
    assert float(ds.fd_max_abs_error.sel(batch=2, time=5)) == pytest.approx(0.5, abs=1e-6)
    # the directional check catches it too, at the same step
    dsd = rnnjac.verify(
        _wrong_cell(m, corrupt),
        x,
        torch.zeros(3, 20, dtype=torch.float64),
        directions=4,
        generator=torch.Generator().manual_seed(1),
    )
    assert dsd.attrs["passed"] == 0 and (dsd.attrs["worst_batch"], dsd.attrs["worst_time"]) == (2, 5)


@pytest.mark.parametrize("arch", ["rnn_tanh", "gru", "lstm"])
def test_default_eps_sits_in_the_error_minimum(arch):
    """Scan eps: the error curve is V-shaped (round-off left, truncation right); the default is near its bottom."""
    p = Problem(arch, layers=2)
    m, x = p.module(), p.inputs()
    with torch.no_grad():
        exact = rnnjac.jacobians(m, x)
        grid = np.logspace(-11, -1, 21)
        err = np.array([float((rnnjac.finite_difference_jacobians(m, x, eps=e) - exact).abs().max()) for e in grid])
        at_default = float((rnnjac.finite_difference_jacobians(m, x) - exact).abs().max())
    best = err.min()
    assert at_default <= 5 * best
    assert err[0] > 30 * best and err[-1] > 30 * best  # both ends of the V are clearly worse
    assert 1e-8 <= grid[err.argmin()] <= 1e-4


def test_float32_warns_and_still_catches_wrong_jacobians():
    p = Problem("gru", dtype=torch.float32)
    m, x = p.module(), p.inputs()
    with pytest.warns(rnnjac.RnnjacWarning, match="widened"):
        ds = rnnjac.verify(m, x)
    assert ds.attrs["passed"] == 1 and ds.attrs["rtol"] == 1e-4

    def nudge(j):
        j[..., 0, 1] += 1e-3
        return j

    with pytest.warns(rnnjac.RnnjacWarning):
        bad = rnnjac.verify(_wrong_cell(m, nudge), x, torch.zeros(2, 5))
    assert bad.attrs["passed"] == 0


def test_custom_cell_own_jacobian_verified():
    w = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    step = lambda s, x: torch.tanh(s @ w.T + x)  # noqa: E731
    good = rnnjac.CustomCell(step, jacobian=lambda s, x: (1 - step(s, x) ** 2).unsqueeze(-1) * w)
    bad = rnnjac.CustomCell(step, jacobian=lambda s, x: (1 - step(s, x) ** 2).unsqueeze(-1) * w.T)
    x, h0 = torch.randn(2, 5, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
    assert rnnjac.verify(good, x, h0).attrs["passed"] == 1
    assert rnnjac.verify(bad, x, h0).attrs["passed"] == 0


def test_bad_input():
    m, x = Problem("gru").module(), Problem("gru").inputs()
    with pytest.raises(ValueError, match="eps must be a positive number; got 0"):
        rnnjac.verify(m, x, eps=0)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        rnnjac.finite_difference_jacobians(m, x, eps=-1e-6)
    with pytest.raises(ValueError, match="directions must be an integer >= 1"):
        rnnjac.verify(m, x, directions=0)
    with pytest.raises(ValueError, match="method must be one of"):
        rnnjac.verify(m, x, method="fd")
    with pytest.raises(ValueError, match="rtol must be a non-negative"):
        rnnjac.verify(m, x, rtol=-1)
    relu = Problem("rnn_relu").module()
    with torch.no_grad():
        relu.weight_hh_l0.copy_(torch.eye(5, dtype=torch.float64) * 1e200)
        relu.bias_hh_l0.fill_(1e200)
    with pytest.raises(rnnjac.NonFiniteError, match="state becomes NaN/Inf at step t=2"):
        rnnjac.verify(relu, x)
    with torch.no_grad():
        m.weight_hh_l0[0, 0] = float("nan")
    with pytest.raises(rnnjac.NonFiniteError, match="weights contain NaN"):
        rnnjac.verify(m, x)


def test_dtype_checks_a_float64_copy_without_touching_the_model():
    p = Problem("lstm", layers=2, dtype=torch.float32)
    m, x = p.module(), p.inputs()
    ds = rnnjac.verify(m, x, dtype=torch.float64)  # no widening warning: the check is in float64
    assert ds.attrs["passed"] == 1 and ds.attrs["rtol"] == 1e-6 and ds.attrs["dtype"] == "float64"
    assert all(t.dtype == torch.float32 for t in m.parameters())
