"""Backward and covariant Lyapunov vectors (:func:`rnnjac.lyapunov_vectors`, :mod:`rnnjac._clv`).

References are independent of the QR chain: the eigenvectors of a linear map with a known non-orthogonal
eigenbasis, the materialised Jacobians of :func:`rnnjac.jacobians`, the QR of the explicit product
``J_t ... J_1 Q_0``, :func:`rnnjac.lyapunov_spectrum`'s exponents and scipy's principal angles.
"""

import numpy as np
import pytest
import scipy.linalg
import torch

import rnnjac
from rnnjac import _clv
from rnnjac._datasets import validate
from rnnjac._lyapunov_qr import initial_basis

F64 = torch.float64


def _unsigned_error(v: np.ndarray, ref: np.ndarray) -> float:
    """Largest entry of ``|v - ref|`` after flipping each column of ``v`` (last axis) to ``ref``'s sign."""
    sign = np.sign(np.sum(v * ref, axis=-2, keepdims=True))
    return float(np.abs(v * sign - ref).max())


# ----------------------------------------------------------------------------- a linear map with known vectors
EIGVECS = torch.tensor([[1.0, 0.6, 0.2], [0.0, 1.0, 0.7], [0.3, 0.0, 1.0]], dtype=F64)  # not orthogonal
EIGVALS = torch.tensor([2.0, -0.9, 0.5], dtype=F64)  # real, distinct moduli; one negative (the vector flips)


def _linear_cell(eigvals=EIGVALS):
    a = EIGVECS @ torch.diag(eigvals) @ torch.linalg.inv(EIGVECS)
    return rnnjac.CustomCell(lambda s, x: s @ a.T, lambda s, x: a.expand(s.shape[0], 3, 3))


def _linear_run(**kwargs):
    x, h0 = torch.zeros(2, 160, 1, dtype=F64), torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    kwargs = dict(tangent_warmup=60, backward_transient=60, generator=torch.Generator().manual_seed(1)) | kwargs
    return rnnjac.lyapunov_vectors(_linear_cell(), x, h0, **kwargs)


def test_clvs_of_a_linear_map_are_its_eigenvectors():
    ds = _linear_run(times=[60, 61, 75, 100])
    validate(ds)
    unit = (EIGVECS / EIGVECS.norm(dim=0)).numpy()
    clv = ds.covariant_lyapunov_vectors.values  # (batch, time, unit, le_index)
    assert clv.shape == (2, 4, 3, 3)
    assert _unsigned_error(clv, unit) < 1e-8
    expected = np.log(EIGVALS.abs().numpy())
    np.testing.assert_allclose(ds.covariant_exponents.values, np.broadcast_to(expected, (2, 3)), atol=1e-10)
    np.testing.assert_allclose(ds.lyapunov_exponents.values, np.broadcast_to(expected, (2, 3)), atol=1e-10)
    # the eigenvalue -0.9 flips v_2 each step: J v_2(t-1) = +g v_2(t), so v_2 alternates in sign
    assert np.all(np.sign(clv[:, 0, :, 1] @ unit[:, 1]) == -np.sign(clv[:, 1, :, 1] @ unit[:, 1]))
    # participation ratio of the eigenvectors, from its definition
    pr = (unit**2).sum(0) ** 2 / (unit**4).sum(0)
    np.testing.assert_allclose(ds.participation_ratio.values, np.broadcast_to(pr, (2, 4, 3)), rtol=1e-8)
    assert ds.attrs["participation_ratio_of"] == "covariant"


def test_unstable_stable_angle_matches_scipy():
    unit = (EIGVECS / EIGVECS.norm(dim=0)).numpy()
    ds = _linear_run(times=[80])
    assert ds.unstable_dimension.values.tolist() == [1, 1]  # one exponent > 0
    want = scipy.linalg.subspace_angles(unit[:, :1], unit[:, 1:]).min()
    np.testing.assert_allclose(ds.unstable_stable_angle.values, want, rtol=1e-8)
    ds = _linear_run(times=[80], split=2)
    want = scipy.linalg.subspace_angles(unit[:, :2], unit[:, 2:]).min()
    np.testing.assert_allclose(ds.unstable_stable_angle.values, want, rtol=1e-8)
    assert ds.unstable_dimension.values.tolist() == [2, 2]


def test_subspace_angle_is_accurate_for_near_tangencies():
    eps = 1e-9
    v = torch.tensor([[[1.0, 1.0, 0.0], [0.0, eps, 0.0], [0.0, 0.0, 1.0]]], dtype=F64)
    assert _clv.subspace_angle(v, torch.tensor([1])).item() == pytest.approx(eps, rel=1e-6)
    assert torch.isnan(_clv.subspace_angle(v, torch.tensor([0]))).all()


def test_participation_ratio_of_known_vectors():
    v = torch.zeros(10, 3, dtype=F64)
    v[:4, 0] = 0.5  # four equal entries
    v[7, 1] = -1.0  # one unit
    v[:, 2] = torch.arange(1.0, 11.0)  # (sum i^2)^2 / sum i^4 = 385^2 / 25333
    np.testing.assert_allclose(_clv.participation_ratio(v).numpy(), [4.0, 1.0, 385**2 / 25333], rtol=1e-14)
    np.testing.assert_allclose(_clv.participation_ratio(3.0 * v).numpy(), _clv.participation_ratio(v).numpy())


# ----------------------------------------------------------------------------- a chaotic tanh RNN (g = 2)
def _chaotic(d=24, seed=4, batch=2):
    gen = torch.Generator().manual_seed(seed)
    rnn = torch.nn.RNN(1, d, bias=False, batch_first=True).double()
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(2.0 * torch.randn(d, d, generator=gen, dtype=F64) / d**0.5)
    return rnn, 0.5 * torch.randn(1, batch, d, generator=gen, dtype=F64)


def test_clvs_are_covariant_and_their_growth_gives_the_exponents():
    rnn, h0 = _chaotic()
    steps, kw = 1300, dict(k=8, warmup=100, tangent_warmup=300)
    x = torch.zeros(2, steps, 1, dtype=F64)
    ds = rnnjac.lyapunov_vectors(
        rnn, x, h0, times=[500, 501], backward_transient=300, generator=torch.Generator().manual_seed(1), **kw
    )
    v = ds.covariant_lyapunov_vectors.values
    jac = rnnjac.jacobians(rnn, x, h0)[:, 500].detach().numpy()  # J_501 maps a tangent at s_500 to s_501
    jv = jac @ v[:, 0]
    growth = np.einsum("bdk,bdk->bk", jv, v[:, 1])
    assert (growth > 0).all()  # J_t v_i(t-1) = +g v_i(t)
    residual = np.linalg.norm(jv - growth[:, None, :] * v[:, 1], axis=1) / np.linalg.norm(jv, axis=1)
    assert residual.max() < 1e-8
    # the log-average growth equals lambda_i of lyapunov_spectrum over the same steps (300 < t <= 1000)
    ls = rnnjac.lyapunov_spectrum(rnn, x[:, : steps - 300], h0, generator=torch.Generator().manual_seed(1), **kw)
    assert float(ls.lyapunov_exponents[:, 0].min()) > 0.05  # chaotic
    clv, qr = ds.covariant_exponents.values, ls.lyapunov_exponents.values
    np.testing.assert_allclose(clv[:, 0], qr[:, 0], atol=1e-10)  # v_1 = q_1 grows by R_11
    np.testing.assert_allclose(clv, qr, atol=0.02)
    assert (np.abs(clv.mean(0) - ls.lyapunov_exponents_mean.values) <= ls.lyapunov_exponents_stderr.values).all()


def test_clvs_do_not_depend_on_the_initial_basis():
    rnn, h0 = _chaotic()
    x = torch.zeros(2, 1100, 1, dtype=F64)
    kw = dict(k=6, warmup=100, tangent_warmup=400, backward_transient=400, times=[500, 550, 600])
    runs = [rnnjac.lyapunov_vectors(rnn, x, h0, generator=torch.Generator().manual_seed(s), **kw) for s in (1, 2)]
    first, second = (r.covariant_lyapunov_vectors.values for r in runs)
    assert _unsigned_error(first, second) < 1e-4
    first, second = (r.backward_lyapunov_vectors.values for r in runs)
    assert _unsigned_error(first, second) < 1e-4
    assert not np.allclose(*(r.covariant_exponents.values for r in runs), atol=0, rtol=0)  # not the same run


def test_backward_vectors_are_the_qr_of_the_jacobian_product():
    rnn, h0 = _chaotic(d=8, seed=2)
    x = torch.zeros(2, 60, 1, dtype=F64)
    ds = rnnjac.lyapunov_vectors(
        rnn, x, h0, k=3, times=[0, 8, 16], covariant=False, tangent_warmup=0, generator=torch.Generator().manual_seed(4)
    )
    assert "covariant_lyapunov_vectors" not in ds and ds.attrs["participation_ratio_of"] == "backward"
    q = ds.backward_lyapunov_vectors.values
    np.testing.assert_allclose(np.einsum("btdi,btdj->btij", q, q), np.broadcast_to(np.eye(3), (2, 3, 3, 3)), atol=1e-12)
    jac = rnnjac.jacobians(rnn, x, h0).detach()
    product = initial_basis(8, 3, torch.Generator().manual_seed(4), batch=2)  # J_t ... J_1 Q_0
    np.testing.assert_allclose(q[:, 0], product.numpy(), atol=1e-14)
    for t in range(1, 17):  # short: the explicit product loses its small directions to round-off
        product = jac[:, t - 1] @ product
        if t in (8, 16):
            want, r = torch.linalg.qr(product)
            want = want * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
            np.testing.assert_allclose(q[:, t // 8], want.numpy(), atol=1e-10)


def test_exponents_are_those_of_lyapunov_spectrum():
    rnn, h0 = _chaotic(d=10, seed=3)
    x = torch.zeros(2, 200, 1, dtype=F64)
    kw = dict(k=4, warmup=20, tangent_warmup=50)
    ds = rnnjac.lyapunov_vectors(rnn, x, h0, generator=torch.Generator().manual_seed(7), **kw)
    ls = rnnjac.lyapunov_spectrum(rnn, x, h0, generator=torch.Generator().manual_seed(7), **kw)
    np.testing.assert_allclose(np.sort(ds.lyapunov_exponents.values)[:, ::-1], ls.lyapunov_exponents.values, atol=1e-12)


# ----------------------------------------------------------------------------- spilling, defaults, layouts
def test_spilled_r_factors_give_the_same_answer(tmp_path):
    rnn, h0 = _chaotic(d=10, seed=1)
    x = torch.zeros(2, 200, 1, dtype=F64)
    kw = dict(k=3, times=[60, 90, 120], tangent_warmup=50, backward_transient=70)
    memory = rnnjac.lyapunov_vectors(rnn, x, h0, generator=torch.Generator().manual_seed(3), **kw)
    assert memory.attrs["r_factors_spilled"] == 0
    per_step = 2 * 3 * 3 * 8
    for budget in (0, 7 * per_step):  # one step per chunk; 7 steps per chunk and a shorter last one (150 = 21*7+3)
        spilled = rnnjac.lyapunov_vectors(
            rnn, x, h0, generator=torch.Generator().manual_seed(3), spill_dir=tmp_path, max_memory=budget, **kw
        )
        assert spilled.attrs["r_factors_spilled"] == 1
        for name in ("covariant_lyapunov_vectors", "covariant_exponents", "unstable_stable_angle"):
            np.testing.assert_array_equal(spilled[name].values, memory[name].values)
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone


def test_r_store_reads_back_in_reverse(tmp_path):
    with _clv.RStore(5, 1, 1, F64, "cpu", max_memory=16, spill_dir=tmp_path) as store:  # 2 steps per chunk
        for t in range(5):
            store.put(torch.full((1, 1, 1), float(t), dtype=F64))
        chunks = [(j0, rs.flatten().tolist()) for j0, rs in store.reversed_chunks()]
        assert len(list(tmp_path.iterdir())) == 1
    assert chunks == [(3, [3.0, 4.0]), (1, [1.0, 2.0]), (0, [0.0])]
    assert list(tmp_path.iterdir()) == []


def test_defaults_and_layout():
    lstm = torch.nn.LSTM(2, 5, batch_first=True)
    ds = rnnjac.lyapunov_vectors(lstm, torch.randn(3, 84, 2), k=2, warmup=4, state="h")
    assert (ds.attrs["tangent_warmup"], ds.attrs["backward_transient"]) == (20, 20)
    assert ds.time.values.tolist() == [24, 34, 44, 54, 64]  # five evenly spaced in [warmup + 20, T - 20]
    assert ds.sizes["unit"] == 5 and set(ds.part.values) == {"h"}
    assert ds.covariant_lyapunov_vectors.dtype == np.float32
    norms = np.linalg.norm(ds.covariant_lyapunov_vectors.values, axis=2)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    validate(ds)


def test_collapsed_direction_is_refused():
    a = torch.diag(torch.tensor([2.0, 0.5, 0.0], dtype=F64))
    cell = rnnjac.CustomCell(lambda s, x: s @ a.T, lambda s, x: a.expand(s.shape[0], 3, 3))
    x, h0 = torch.zeros(1, 40, 1, dtype=F64), torch.ones(1, 3, dtype=F64)
    with pytest.raises(rnnjac.NonFiniteError, match="collapse direction 3.*k=2"):
        rnnjac.lyapunov_vectors(cell, x, h0)
    assert rnnjac.lyapunov_vectors(cell, x, h0, k=2).covariant_exponents.shape == (1, 2)


@pytest.mark.parametrize("covariant", [True, False])
def test_non_finite_tangents_are_refused(covariant):
    nan = torch.full((3, 3), float("nan"))
    cell = rnnjac.CustomCell(lambda s, x: 0.5 * s, lambda s, x: nan.expand(s.shape[0], 3, 3))  # a wrong closed form
    with pytest.raises(rnnjac.NonFiniteError, match="tangents J_t Q became NaN"):
        rnnjac.lyapunov_vectors(cell, torch.zeros(1, 20, 1), torch.ones(1, 3), covariant=covariant)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=7), r"k must be an integer with 1 <= k <= D = 6.*got 7"),
        (dict(k=0), r"k must be.*got 0"),
        (dict(times=[5]), r"times must lie in \[10, 30\].*got \[5\]"),
        (dict(times=[31]), r"times must lie in \[10, 30\]"),
        (dict(times=[12.5]), r"times must be a non-empty sequence of integer"),
        (dict(times=[]), r"times must be a non-empty sequence"),
        (dict(backward_transient=30), r"backward_transient must leave at least one step of the 30 steps"),
        (dict(tangent_warmup=40), r"warmup \+ tangent_warmup must leave at least one counted step"),
        (dict(split=3), r"split must be None or an integer with 1 <= split <= k - 1 = 2; got 3"),
        (dict(max_memory=-1), r"max_memory must be an integer >= 0"),
        (dict(spill_dir="/no/such/dir"), r"spill_dir must be an existing directory"),
    ],
)
def test_bad_input_fails_before_work(monkeypatch, kwargs, match):
    def no_work(*args, **kw):
        raise AssertionError("the vectors were computed before the arguments were checked")

    monkeypatch.setattr("rnnjac._lyapunov_vectors.lyapunov_vector_tensors", no_work)
    kwargs = dict(k=3, tangent_warmup=10, backward_transient=10) | kwargs
    with pytest.raises(ValueError, match=match):
        rnnjac.lyapunov_vectors(torch.nn.RNN(1, 6, batch_first=True), torch.zeros(1, 40, 1), **kwargs)


@pytest.mark.gpu
def test_cuda_gives_the_cpu_vectors(tmp_path):
    rnn, h0 = _chaotic(d=16, seed=0)
    x = torch.zeros(2, 300, 1, dtype=F64)
    kw = dict(k=5, times=[150, 151], tangent_warmup=100, backward_transient=100)
    cpu = rnnjac.lyapunov_vectors(rnn, x, h0, generator=torch.Generator().manual_seed(0), **kw)
    for budget in (_clv.DEFAULT_MAX_MEMORY, 0):  # in GPU memory, then spilled from the GPU to disk
        gpu = rnnjac.lyapunov_vectors(
            rnn.cuda(), x.cuda(), h0.cuda(), generator=torch.Generator().manual_seed(0), max_memory=budget,
            spill_dir=tmp_path, **kw,
        )  # fmt: skip
        assert gpu.attrs["device"].startswith("cuda") and gpu.attrs["r_factors_spilled"] == int(budget == 0)
        for name in ("backward_lyapunov_vectors", "covariant_lyapunov_vectors", "covariant_exponents"):
            np.testing.assert_allclose(gpu[name].values, cpu[name].values, atol=1e-8)
        rnn = rnn.cpu()
