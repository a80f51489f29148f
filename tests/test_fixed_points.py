"""Fixed points and slow points: known answers, independent checks of J at the points, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from torch import nn

import rnnjac
from rnnjac._fixed_points import fixed_points
from rnnjac.errors import NonFiniteError, RnnjacWarning

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def match_eigenvalues(found: np.ndarray, want: np.ndarray, atol: float) -> None:
    """Every wanted eigenvalue has a found one within ``atol`` (one-to-one, greedy)."""
    assert found.shape == want.shape
    left = list(found)
    for w in want:
        j = int(np.argmin([abs(f - w) for f in left]))
        assert abs(left[j] - w) < atol, (w, left[j])
        left.pop(j)


def eig_of(ds, i) -> np.ndarray:
    return ds.fixed_point_eigenvalues_real.values[i] + 1j * ds.fixed_point_eigenvalues_imag.values[i]


def rnn_with(w_hh, *, nonlinearity="tanh", bias=None, input_size=1):
    h = w_hh.shape[0]
    rnn = nn.RNN(input_size, h, nonlinearity=nonlinearity, bias=bias is not None, batch_first=True).double()
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(w_hh)
        if bias is not None:
            rnn.bias_ih_l0.copy_(bias)
            rnn.bias_hh_l0.zero_()
    return rnn


# ----------------------------------------------------------------------------- known answers
def test_linear_rnn_single_fixed_point_and_eigenvalues():
    """relu RNN in its linear region (W >= 0, b > 0): s* = (I - W)^-1 b, J = W."""
    d = 6
    w = torch.rand(d, d, generator=gen(1), dtype=F64) * 0.8 / d
    b = torch.rand(d, generator=gen(2), dtype=F64) + 0.5
    rnn = rnn_with(w, nonlinearity="relu", bias=b)
    ds = fixed_points(rnn, initial_states=torch.rand(32, d, generator=gen(3), dtype=F64) * 3)
    want = torch.linalg.solve(torch.eye(d, dtype=F64) - w, b).numpy()
    assert ds.sizes["fixed_point"] == 1 and int(ds.is_fixed_point[0]) == 1
    np.testing.assert_allclose(ds.fixed_point_states.values[0], want, atol=1e-10, rtol=0)
    match_eigenvalues(eig_of(ds, 0), np.linalg.eigvals(w.numpy()), 1e-10)
    assert int(ds.stable[0]) == 1 and ds.attrs["n_converged"] == 32


def test_linear_custom_cell_with_eigenvalues_outside_the_unit_circle():
    d = 4
    w = torch.randn(d, d, generator=gen(4), dtype=F64) * 1.5
    b = torch.randn(d, generator=gen(5), dtype=F64)
    cell = rnnjac.CustomCell(lambda s, x: s @ w.T + b + x)
    ds = fixed_points(cell, torch.zeros(d, dtype=F64), torch.randn(20, d, generator=gen(6), dtype=F64))
    want = torch.linalg.solve(torch.eye(d, dtype=F64) - w, b).numpy()
    assert ds.sizes["fixed_point"] == 1
    np.testing.assert_allclose(ds.fixed_point_states.values[0], want, atol=1e-10, rtol=0)
    lam = np.linalg.eigvals(w.numpy())
    match_eigenvalues(eig_of(ds, 0), lam, 1e-10)
    assert int(ds.n_unstable[0]) == int((np.abs(lam) > 1).sum()) > 0
    assert ds.attrs["jacobian_method"] == "autograd"


def test_contracting_tanh_rnn_has_only_the_origin():
    n, g = 20, 0.8
    w = torch.randn(n, n, generator=gen(7), dtype=F64) * g / n**0.5
    rnn = rnn_with(w, input_size=3)
    ds = fixed_points(rnn, None, torch.randn(64, n, generator=gen(8), dtype=F64) * 2)
    assert ds.sizes["fixed_point"] == 1 and ds.attrs["n_slow_points"] == 0
    assert np.abs(ds.fixed_point_states.values[0]).max() < 1e-10
    match_eigenvalues(eig_of(ds, 0), np.linalg.eigvals(w.numpy()), 1e-10)  # J = W at the origin


def test_one_tanh_unit_has_three_fixed_points():
    w = 1.7
    rnn = rnn_with(torch.tensor([[w]], dtype=F64))
    ds = fixed_points(rnn, initial_states=torch.linspace(-2, 2, 41, dtype=F64).unsqueeze(1))
    s_star = brentq(lambda s: s - np.tanh(w * s), 0.1, 2.0, xtol=1e-15)
    assert ds.sizes["fixed_point"] == 3 and ds.attrs["n_slow_points"] == 0
    order = np.argsort(ds.fixed_point_states.values[:, 0])
    np.testing.assert_allclose(ds.fixed_point_states.values[order, 0], [-s_star, 0.0, s_star], atol=1e-12)
    assert ds.stable.values[order].tolist() == [1, 0, 1]
    np.testing.assert_allclose(
        ds.fixed_point_eigenvalues_real.values[order, 0], [w * (1 - s_star**2), w, w * (1 - s_star**2)]
    )
    assert (ds.converged.values == 1).all() and (ds.point_index.values >= 0).all()


def test_lstm_origin_with_analytic_eigenvalues():
    """Zero input and biases: the origin is fixed, J = [[W/4, I/4], [W/2, I/2]] (W = W_hg), whose
    eigenvalues are 1/2 + eig(W)/4 and H zeros."""
    h = 4
    lstm = nn.LSTM(2, h, bias=False, batch_first=True).double()
    with torch.no_grad():
        lstm.weight_hh_l0.mul_(0.5)
    w_g = lstm.weight_hh_l0.detach()[2 * h : 3 * h].numpy()
    starts = torch.cat([torch.zeros(1, 2 * h, dtype=F64), 0.3 * torch.randn(15, 2 * h, generator=gen(9), dtype=F64)])
    ds = fixed_points(lstm, initial_states=starts)
    at0 = np.flatnonzero(np.abs(ds.fixed_point_states.values).max(-1) < 1e-12)
    assert len(at0) == 1
    want = np.concatenate([0.5 + np.linalg.eigvals(w_g) / 4, np.zeros(h)])
    match_eigenvalues(eig_of(ds, at0[0]), want, 1e-10)


# ----------------------------------------------------------------------------- J at the points, residuals
def flat_to_module(model, s: torch.Tensor):
    """Flat layer-major states -> the module's own h0 (LSTM: (h, c))."""
    hp = model.proj_size or model.hidden_size if isinstance(model, nn.LSTM) else model.hidden_size
    hs, cs, off = [], [], 0
    for _ in range(model.num_layers):
        hs.append(s[:, off : off + hp])
        off += hp
        if isinstance(model, nn.LSTM):
            cs.append(s[:, off : off + model.hidden_size])
            off += model.hidden_size
    h = torch.stack(hs)
    return (h, torch.stack(cs)) if isinstance(model, nn.LSTM) else h


def module_step(model, s, x):
    """One step of the module's own forward, flattened back (independent of rnnjac's step)."""
    _, hn = model(x.expand(s.shape[0], -1).unsqueeze(1), flat_to_module(model, s))
    if isinstance(model, nn.LSTM):
        h, c = hn
        return torch.cat([t for li in range(model.num_layers) for t in (h[li], c[li])], -1)
    return torch.cat(list(hn), -1)


MODELS = {
    "gru": lambda: nn.GRU(2, 5, batch_first=True),
    "lstm": lambda: nn.LSTM(2, 4, batch_first=True),
    "gru-L2": lambda: nn.GRU(2, 4, num_layers=2, batch_first=True),
    "lstm-L2-proj": lambda: nn.LSTM(2, 4, num_layers=2, proj_size=2, batch_first=True),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_jacobian_at_every_point_passes_verify(name):
    torch.manual_seed(11)
    model = MODELS[name]().double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # strong weights: several fixed points
    x_star = torch.tensor([0.3, -0.2], dtype=F64)
    traj = rnnjac.trajectory(model, torch.randn(8, 30, 2, generator=gen(12), dtype=F64)).detach()
    ds = fixed_points(model, x_star, traj, n_initial=64, noise=0.05, generator=gen(13))
    pts = torch.from_numpy(ds.fixed_point_states.values)
    assert pts.shape[0] >= 1 and ds.attrs["n_fixed_points"] >= 1
    fixed = torch.from_numpy(ds.is_fixed_point.values.astype(bool))
    with torch.no_grad():
        res = module_step(model, pts, x_star) - pts
    q = 0.5 * res.pow(2).sum(-1)
    assert (q[fixed] <= 1e-10).all() and (torch.from_numpy(ds.q.values)[fixed] <= 1e-10).all()
    xs = x_star.expand(pts.shape[0], 1, 2).contiguous()
    assert rnnjac.verify(model, xs, pts).attrs["passed"] == 1
    fd = rnnjac.finite_difference_jacobians(model, xs, pts)[:, 0].detach().numpy()
    for i in range(pts.shape[0]):
        match_eigenvalues(eig_of(ds, i), np.linalg.eigvals(fd[i]), 1e-6)
    assert (ds.stable.values == (np.abs(np.linalg.eigvals(fd)) <= 1 + 1e-10).all(-1)).all()


def test_newton_and_adam_find_the_same_fixed_points():
    """Two coupled tanh units with w > 1: nine fixed points (four stable corners, four saddles, the origin)."""
    rnn = rnn_with(torch.tensor([[2.0, 0.2], [0.1, 2.0]], dtype=F64))
    starts = 2.4 * torch.rand(60, 2, generator=gen(14), dtype=F64) - 1.2
    newton = fixed_points(rnn, initial_states=starts)
    adam = fixed_points(rnn, initial_states=starts, method="adam", tol=1e-16, lr=1e-2, max_iter=6000)
    a = newton.fixed_point_states.values[newton.is_fixed_point.values == 1]
    b = adam.fixed_point_states.values[adam.is_fixed_point.values == 1]
    assert len(a) == len(b) == 9
    dist = np.linalg.norm(a[:, None] - b[None], axis=-1)
    assert dist.min(1).max() < 1e-6 and dist.min(0).max() < 1e-6
    assert int(newton.stable.sum()) == 4


def test_slow_points_are_kept_and_labelled():
    """s' = s + 0.01 + 0.1 (s^2 - 1)^2, the ghost of a saddle-node: q has its minimum 0.5e-4 > tol at s = 1."""
    cell = rnnjac.CustomCell(lambda s, x: s + 0.01 + 0.1 * (s**2 - 1) ** 2 + x)
    with pytest.warns(RnnjacWarning, match=r"no fixed point \(q <= tol\) found.*11 stalled"):
        ds = fixed_points(cell, torch.zeros(1, dtype=F64), torch.linspace(0.5, 1.5, 11, dtype=F64).unsqueeze(1))
    assert ds.attrs["n_fixed_points"] == 0 and ds.attrs["n_slow_points"] >= 1
    i = int(np.argmin(ds.q.values))
    assert abs(ds.fixed_point_states.values[i, 0] - 1.0) < 1e-3 and ds.q.values[i] == pytest.approx(0.5e-4, rel=1e-3)
    assert int(ds.is_fixed_point[i]) == 0 and (ds.status.values == 1).all()


# ----------------------------------------------------------------------------- options and layout
def test_input_conditions_give_a_condition_dim():
    rnn = rnn_with(torch.tensor([[1.5]], dtype=F64))
    with torch.no_grad():
        rnn.weight_ih_l0.fill_(1.0)
    ds = fixed_points(rnn, torch.tensor([[0.0], [1.0]], dtype=F64), torch.linspace(-2, 2, 21, dtype=F64)[:, None])
    assert ds.sizes["condition"] == 2 and ds.converged.dims == ("condition", "initial_state")
    counts = np.bincount(ds.condition_index.values[ds.is_fixed_point.values == 1], minlength=2)
    assert counts.tolist() == [3, 1]
    one = ds.fixed_point_states.values[ds.condition_index.values == 1, 0]
    assert abs(one[0] - np.tanh(1.5 * one[0] + 1.0)) < 1e-12


def test_eigenvectors_and_module_format_and_state_h():
    torch.manual_seed(15)
    lstm = nn.LSTM(2, 3, num_layers=2, batch_first=True).double()
    starts = (0.5 * torch.randn(2, 10, 3, dtype=F64), 0.5 * torch.randn(2, 10, 3, dtype=F64))
    ds = fixed_points(lstm, initial_states=starts, eigenvectors=3)
    flat = torch.cat([starts[0][0], starts[1][0], starts[0][1], starts[1][1]], -1)
    same = fixed_points(lstm, initial_states=flat)
    np.testing.assert_allclose(ds.fixed_point_states.values, same.fixed_point_states.values)
    s = torch.from_numpy(ds.fixed_point_states.values[:1])
    x0 = torch.zeros(2, dtype=F64)
    j = torch.func.jacrev(lambda v: module_step(lstm, v[None], x0)[0])(s[0]).detach().numpy()  # the module's forward
    for k in range(3):
        lam = eig_of(ds, 0)[k]
        r = ds.right_eigenvectors_real.values[0, k] + 1j * ds.right_eigenvectors_imag.values[0, k]
        left = ds.left_eigenvectors_real.values[0, k] + 1j * ds.left_eigenvectors_imag.values[0, k]
        np.testing.assert_allclose(j @ r, lam * r, atol=1e-10)
        np.testing.assert_allclose(left @ j, lam * left, atol=1e-10)
        assert abs(left @ r - 1) < 1e-10
    h = fixed_points(lstm, initial_states=flat, state="h")
    assert h.sizes["unit"] == 6 and h.sizes["eig_index"] == 6 and set(h.part.values) == {"h"}


def test_float32_model_is_solved_in_float64_and_left_alone():
    gru = nn.GRU(2, 4, batch_first=True)
    before = {k: v.clone() for k, v in gru.state_dict().items()}
    ds = fixed_points(gru, initial_states=torch.randn(8, 4, generator=gen(16)))
    assert ds.attrs["dtype"] == "float64" and ds.fixed_point_states.dtype == np.float64
    assert (ds.q.values[ds.is_fixed_point.values == 1] <= 1e-10).all()
    assert all(torch.equal(before[k], v) for k, v in gru.state_dict().items())


def test_dataset_round_trips_through_netcdf(tmp_path):
    ds = fixed_points(nn.GRU(2, 3, batch_first=True), initial_states=torch.randn(6, 3, generator=gen(17)))
    for name, var in ds.data_vars.items():
        assert var.attrs["long_name"] and "units" in var.attrs, name
    from rnnjac import _datasets as datasets

    datasets.validate(ds)
    path = rnnjac.save(ds, tmp_path / "fp.nc")
    back = rnnjac.open_dataset(path)
    np.testing.assert_array_equal(back.fixed_point_states.values, ds.fixed_point_states.values)


def test_nothing_found_is_a_warning_with_an_empty_dim():
    """No fixed point: q decreases only towards s -> -inf, so every search runs away (outliers)."""
    cell = rnnjac.CustomCell(lambda s, x: s + 1 + 0.1 * torch.tanh(s) + x)
    with pytest.warns(RnnjacWarning, match="no fixed point or slow point found.*outlier"):
        ds = fixed_points(cell, torch.zeros(1, dtype=F64), torch.randn(10, 1, generator=gen(18), dtype=F64))
    assert ds.sizes["fixed_point"] == 0 and (ds.point_index.values == -1).all()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"initial_states": torch.zeros(5, 4)}, ValueError, r"initial_states must be flat states \(N, D\) with D = 3"),
        ({"initial_states": torch.full((5, 3), float("nan"))}, NonFiniteError, "initial_states contain NaN"),
        ({"inputs": torch.zeros(3)}, ValueError, "input_size=2"),
        ({"inputs": torch.zeros(2, 1, 2)}, ValueError, r"\(I,\) or several conditions \(C, I\)"),
        ({"initial_states": torch.zeros(5, 3), "n_initial": 6}, ValueError, "n_initial=6 is larger"),
        ({"method": "lbfgs"}, ValueError, "method must be one of"),
        ({"tol": 0.0}, ValueError, "tol must be a positive number"),
        ({"eigenvectors": 4}, ValueError, "1 <= k <= D = 3"),
    ],
)
def test_bad_input_is_one_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        fixed_points(nn.GRU(2, 3, batch_first=True), **kwargs)


def test_bidirectional_and_custom_without_states_are_refused():
    with pytest.raises(ValueError, match="bidirectional"):
        fixed_points(nn.GRU(2, 3, bidirectional=True), initial_states=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="initial_states is required"):
        fixed_points(rnnjac.CustomCell(lambda s, x: s), torch.zeros(1))
    with pytest.raises(ValueError, match="inputs is required"):
        fixed_points(rnnjac.CustomCell(lambda s, x: s), None, torch.zeros(3, 1))


# ----------------------------------------------------------------------------- plots
def test_plots_draw_points_and_eigenvalues():
    import matplotlib.pyplot as plt

    rnn = rnn_with(torch.tensor([[2.0, 0.2], [0.1, 2.0]], dtype=F64))
    ds = fixed_points(rnn, initial_states=2.4 * torch.rand(40, 2, generator=gen(19), dtype=F64) - 1.2)
    traj = rnnjac.trajectory(rnn, torch.zeros(5, 20, 1, dtype=F64), torch.randn(5, 2, generator=gen(20), dtype=F64))
    ax = rnnjac.plot.fixed_points(ds, traj)
    labels = ax.get_legend_handles_labels()[1]
    assert "stable fixed points (4)" in labels and "unstable fixed points (5)" in labels
    ax2 = rnnjac.plot.fixed_point_eigenvalues(ds)
    assert ax2.get_aspect() == 1.0
    with pytest.raises(ValueError, match="trajectories must be"):
        rnnjac.plot.fixed_points(ds, torch.zeros(3, 5, 7))
    with pytest.raises(ValueError, match="fixed-point dataset"):
        rnnjac.plot.fixed_points(ds.drop_vars("stable"))
    plt.close("all")


def test_newton_in_chunks_of_points_gives_the_same_points(monkeypatch):
    """A memory bound that allows only 3 points' Jacobians at once (the LSTM H=512 / 4096 states case on a GPU):
    the solve goes chunk by chunk and finds the same 9 fixed points of two uncoupled bistable units (each
    ``s = tanh(1.7 s)`` has 3), with the same statuses, as the solve all at once."""
    rnn = rnn_with(torch.diag(torch.tensor([1.7, 1.7], dtype=F64)))
    starts = torch.cartesian_prod(*[torch.linspace(-2, 2, 7, dtype=F64)] * 2)
    whole = fixed_points(rnn, initial_states=starts)
    monkeypatch.setattr("rnnjac._fixed_points.MAX_JACOBIAN_ELEMENTS", 3 * 2 * 2)
    chunked = fixed_points(rnn, initial_states=starts)
    assert whole.sizes["fixed_point"] == chunked.sizes["fixed_point"] == 9
    np.testing.assert_allclose(chunked.fixed_point_states.values, whole.fixed_point_states.values, atol=1e-12)
    np.testing.assert_array_equal(chunked.status.values, whole.status.values)
