"""The tensor kernels on their own (rnnjac._kernels, rnnjac._fd): tensors in, tensors out, against references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from problems import Problem

import rnnjac
from rnnjac._checks import prepare
from rnnjac._fd import compare_jacobians, fd_columns
from rnnjac._kernels import linearization_stream, spectra_tensors, step_spectra
from rnnjac._lyapunov_qr import LyapunovQR, initial_basis
from rnnjac._options import SpectraOptions

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run_map(acc: LyapunovQR, jac: torch.Tensor, steps: int) -> list:
    """Feed the constant map ``jac (B, D, D)`` for t = 1..steps; returns the flags that step() gave."""
    return [acc.step(t, lambda q: jac @ q) for t in range(1, steps + 1)]


# ----------------------------------------------------------------------------- initial basis
def test_initial_basis_is_orthonormal_shared_and_seeded():
    q = initial_basis(7, 3, gen(4), torch.float32, "cpu", batch=5)
    assert q.shape == (5, 7, 3) and q.dtype == torch.float32 and q.is_contiguous()
    assert torch.equal(q[0], q[4])  # one basis for every sample
    torch.testing.assert_close(q[0].T @ q[0], torch.eye(3), atol=1e-6, rtol=0)
    assert torch.equal(initial_basis(7, 3, gen(4), torch.float32, batch=5), q)
    # the same draw as a plain QR of a float64 Gaussian (diag(R) > 0)
    ref, r = torch.linalg.qr(torch.randn(7, 3, generator=gen(4), dtype=F64))
    torch.testing.assert_close(q[0].double(), ref * torch.sign(torch.diagonal(r)), atol=1e-7, rtol=0)


# ----------------------------------------------------------------------------- the Lyapunov QR accumulator
@pytest.mark.parametrize("differentiable", [False, True])
@pytest.mark.parametrize("reortho_every", [1, 4])
def test_triangular_map_gives_exact_log_diagonal(differentiable, reortho_every):
    # with Q_0 = I an upper-triangular J keeps Q diagonal: log R_ii = log |J_ii| exactly at every step
    j = torch.tensor([[0.5, 3.0, -1.0], [0.0, -2.0, 0.7], [0.0, 0.0, 1.25]], dtype=F64).expand(2, 3, 3)
    acc = LyapunovQR(
        torch.eye(3, dtype=F64).expand(2, 3, 3), 40, reortho_every=reortho_every, differentiable=differentiable
    )
    run_map(acc, j, 40)
    res = acc.result()
    want = torch.tensor([2.0, 1.25, 0.5], dtype=F64).log().expand(2, 3)
    torch.testing.assert_close(res.exponents, want, atol=1e-13, rtol=0)
    assert res.counted_steps == 40 and res.counted_qrs == 40 // reortho_every


def test_orthogonal_map_gives_zero_exponents():
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen(2), dtype=F64))
    for differentiable in (False, True):
        acc = LyapunovQR(initial_basis(6, 6, gen(0), batch=3), 300, differentiable=differentiable)
        run_map(acc, q.expand(3, 6, 6), 300)
        torch.testing.assert_close(acc.result().exponents, torch.zeros(3, 6, dtype=F64), atol=1e-13, rtol=0)


def test_symmetric_map_gives_log_abs_eigenvalues():
    eigs = torch.tensor([0.95, -0.9, 0.7, 0.5, -0.3, 0.1], dtype=F64)
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen(0), dtype=F64))
    w = u @ torch.diag(eigs) @ u.T
    steps = 3000
    acc = LyapunovQR(initial_basis(6, 4, gen(1), batch=2), steps, warmup=10, tangent_warmup=100)
    run_map(acc, w.expand(2, 6, 6), steps)
    res = acc.result()
    want = eigs.abs().log().sort(descending=True).values[:4]
    torch.testing.assert_close(res.exponents, want.expand(2, 4), atol=5.0 / steps, rtol=0)
    assert res.counted_steps == steps - 110


def test_transients_and_schedule():
    calls = []
    acc = LyapunovQR(torch.eye(2, dtype=F64)[None], 20, warmup=5, tangent_warmup=4, reortho_every=3, local=True)
    flags = [acc.step(t, lambda q, t=t: calls.append(t) or 0.5 * q) for t in range(1, 21)]
    assert calls == list(range(6, 21))  # the tangents do not move during the warmup
    # QRs at 8, 9 (end of the tangent transient), then every 3 counted steps and at the last step
    qr_at = [t for t, f in enumerate(flags, 1) if f is not None]
    assert qr_at == [8, 9, 12, 15, 18, 20]
    res = acc.result()
    assert res.counted_steps == 11 and res.counted_qrs == 4
    local = res.local[0].numpy()
    counted = [12, 15, 18, 20]
    np.testing.assert_allclose(local[[t - 1 for t in counted]], np.log(0.5), rtol=1e-14)  # per-step growth
    assert np.isnan(np.delete(local, [t - 1 for t in counted], axis=0)).all()
    torch.testing.assert_close(res.exponents, torch.full((1, 2), np.log(0.5), dtype=F64), atol=1e-14, rtol=0)


def test_local_exponents_follow_the_sorted_order_in_both_modes():
    j = torch.diag(torch.tensor([0.5, 3.0, 1.0], dtype=F64))[None]
    out = []
    for differentiable in (False, True):
        acc = LyapunovQR(torch.eye(3, dtype=F64)[None], 6, reortho_every=2, local=True, differentiable=differentiable)
        run_map(acc, j, 6)
        out.append(acc.result().local[0])
    want = torch.full((6, 3), float("nan"), dtype=F64)
    want[1::2] = torch.tensor([3.0, 1.0, 0.5], dtype=F64).log()
    for local in out:
        torch.testing.assert_close(local, want, atol=1e-14, rtol=0, equal_nan=True)


def test_collapse_rule_in_place_and_plain_logs_under_autograd():
    j = torch.diag(torch.tensor([0.5, 0.0, 2.0], dtype=F64))[None]
    acc = LyapunovQR(torch.eye(3, dtype=F64)[None], 10)
    assert all(bool(f) for f in run_map(acc, j, 10))  # diag(R) stays finite: a zero is handled by the rule
    lam = acc.result().exponents[0]
    assert torch.isneginf(lam[2]) and torch.isfinite(lam[:2]).all()
    torch.testing.assert_close(lam[:2], torch.tensor([2.0, 0.5], dtype=F64).log())
    # differentiable: no floor, a zero growth is reported as non-finite at every counted QR
    acc = LyapunovQR(torch.eye(3, dtype=F64)[None], 10, differentiable=True)
    assert not any(bool(f) for f in run_map(acc, j, 10))


def test_gradient_flows_through_the_qr_pass():
    a = torch.tensor([0.5, -2.0, 1.25], dtype=F64, requires_grad=True)
    j = torch.diag_embed(a)[None] + torch.triu(torch.ones(3, 3, dtype=F64), 1)  # triangular: exact log|a|
    acc = LyapunovQR(torch.eye(3, dtype=F64)[None], 25, reortho_every=2, differentiable=True)
    run_map(acc, j, 25)
    (grad,) = torch.autograd.grad(acc.result().exponents.sum(), a)
    torch.testing.assert_close(grad, 1 / a.detach(), atol=1e-12, rtol=0)  # d log|a| / da


def test_penalty_path_equals_spectra_path():
    p = Problem("gru", hidden=6)
    m, x = p.module(), p.inputs(batch=3, steps=80)
    opts = SpectraOptions(singular_values=False, k=4, warmup=10, tangent_warmup=5, reortho_every=3)
    problem = prepare(m, x)
    spectra_path = spectra_tensors(problem, opts, generator=gen(7))["lyapunov_exponents"]
    # the penalty's route: differentiable states, one linearisation, out-of-place QR pass
    states = problem.dyn.run(problem.s0, problem.xs)
    lin = problem.dyn.linearize(states[:, :-1].reshape(3 * 80, -1), problem.xs.reshape(3 * 80, -1), "analytic")
    q0 = initial_basis(problem.dyn.state_size, 4, gen(7), F64, batch=3)
    acc = LyapunovQR(q0, 80, warmup=10, tangent_warmup=5, reortho_every=3, differentiable=True)
    for t, lin_t in enumerate(lin.unbind(80), 1):
        acc.step(t, lambda v, lin_t=lin_t: lin_t.apply(v))
    penalty_path = acc.result().exponents
    assert penalty_path.requires_grad
    torch.testing.assert_close(penalty_path.detach(), spectra_path, atol=1e-12, rtol=0)
    pen = rnnjac.regularizers.lyapunov_penalty(
        m, x, k=4, warmup=10, tangent_warmup=5, reortho_every=3, generator=gen(7), target=0.1
    )
    torch.testing.assert_close(pen.detach(), (spectra_path - 0.1).pow(2).mean(), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- stream and per-step spectra
def test_stream_chunks_reproduce_trajectory_and_jacobians():
    p = Problem("lstm", layers=2)
    m, x = p.module(), p.inputs(batch=2, steps=23)
    problem = prepare(m, x)
    chunks = list(linearization_stream(problem, 5))
    assert [c.t0 for c in chunks] == [0, 5, 10, 15, 20]
    states = torch.cat([chunks[0].states[:, :1]] + [c.states[:, 1:] for c in chunks], 1)
    torch.testing.assert_close(states, rnnjac.trajectory(m, x), atol=1e-14, rtol=0)
    jac = torch.cat([c.lin.materialize().reshape(2, c.states.shape[1] - 1, 20, 20) for c in chunks], 1)
    torch.testing.assert_close(jac, rnnjac.jacobians(m, x).detach(), atol=1e-14, rtol=0)
    assert all(bool(c.finite.all()) for c in chunks)


def test_stream_from_a_later_start_or_precomputed_states():
    p = Problem("gru", layers=2)
    m, x = p.module(), p.inputs(batch=2, steps=23)
    problem = prepare(m, x)
    states = rnnjac.trajectory(m, x)
    jac = rnnjac.jacobians(m, x).detach()
    for kw in (dict(s_start=states[:, 7]), dict(states=states)):
        chunks = list(linearization_stream(problem, 5, start=7, **kw))
        assert [c.t0 for c in chunks] == [7, 12, 17, 22]
        got = torch.cat([c.lin.materialize().reshape(2, c.states.shape[1] - 1, 10, 10) for c in chunks], 1)
        torch.testing.assert_close(got, jac[:, 7:], atol=1e-14, rtol=0)
        torch.testing.assert_close(chunks[-1].states[:, -1], states[:, -1], atol=1e-14, rtol=0)


def test_step_spectra_against_numpy():
    a = torch.randn(4, 7, 7, generator=gen(3), dtype=F64)
    out = step_spectra(a, eigenvalues=True)
    np.testing.assert_allclose(out["singular_values"].numpy(), np.linalg.svd(a.numpy(), compute_uv=False), rtol=1e-12)
    ev = np.linalg.eigvals(a.numpy())
    ev = np.take_along_axis(ev, np.argsort(-np.abs(ev), -1, kind="stable"), -1)
    got = out["eigenvalues_real"].numpy() + 1j * out["eigenvalues_imag"].numpy()
    np.testing.assert_allclose(np.abs(got), np.abs(ev), rtol=1e-10)
    np.testing.assert_allclose(out["spectral_radius"].numpy(), np.abs(ev[:, 0]), rtol=1e-12)
    assert set(step_spectra(a)) == {"singular_values"}


def test_spectra_tensors_structured_and_materialised_paths_agree():
    # k * 16 <= D: J Q through the shared weights; the reference multiplies materialised J_t
    p = Problem("gru", hidden=40)
    m, x = p.module(), p.inputs(batch=2, steps=30)
    problem = prepare(m, x)
    out = spectra_tensors(problem, SpectraOptions(singular_values=False, k=2), generator=gen(1))
    jac = rnnjac.jacobians(m, x).detach()
    acc = LyapunovQR(initial_basis(40, 2, gen(1), F64, batch=2), 30)
    for t in range(1, 31):
        acc.step(t, lambda q, t=t: torch.bmm(jac[:, t - 1], q))
    torch.testing.assert_close(out["lyapunov_exponents"], acc.result().exponents, atol=1e-12, rtol=0)


@pytest.mark.parametrize("lyapunov", [True, False])
def test_spectra_tensors_reports_every_step(lyapunov):
    p = Problem("rnn_tanh")
    problem = prepare(p.module(), p.inputs(batch=2, steps=300))
    calls = []
    out = spectra_tensors(problem, SpectraOptions(lyapunov=lyapunov, eigenvalues=True), on_steps=calls.append)
    assert sum(calls) == 300
    assert calls == [1] * 300 if lyapunov else len(calls) >= 100  # per step, or chunks of ~1%
    assert out["singular_values"].shape == (2, 300, 5) and out["spectral_radius"].shape == (2, 300)


def test_spectra_tensors_checks_options_against_the_problem():
    problem = prepare(Problem("gru").module(), Problem("gru").inputs(steps=10))
    with pytest.raises(ValueError, match=r"k must be an integer with 1 <= k <= D = 5"):
        spectra_tensors(problem, SpectraOptions(k=6))
    with pytest.raises(ValueError, match="warmup must be smaller than the number of steps T = 10"):
        spectra_tensors(problem, SpectraOptions(warmup=10))


# ----------------------------------------------------------------------------- finite differences
def linear_cell(w: torch.Tensor, wrong=None) -> rnnjac.CustomCell:
    n = w.shape[0]
    jac = w if wrong is None else wrong
    return rnnjac.CustomCell(lambda s, x: s @ w.T + x, jacobian=lambda s, x: jac.expand(s.shape[0], n, n))


def test_fd_columns_of_a_linear_map_are_its_matrix():
    w = torch.randn(4, 4, generator=gen(0), dtype=F64)
    system = rnnjac._dynamics.as_dynamics(linear_cell(w), state_size=4)
    s, x = torch.randn(3, 4, dtype=F64) * 10, torch.randn(3, 4, dtype=F64)
    cols = fd_columns(system, "full", s, x, torch.eye(4, dtype=F64).expand(3, 4, 4), 6e-6)
    torch.testing.assert_close(cols, w.expand(3, 4, 4), atol=1e-9, rtol=0)
    v = torch.randn(3, 4, 2, dtype=F64)
    torch.testing.assert_close(fd_columns(system, "full", s, x, v, 6e-6), w @ v, atol=1e-9, rtol=0)


def test_compare_jacobians_finds_the_wrong_entry():
    w = torch.randn(4, 4, generator=gen(1), dtype=F64) * 0.5
    wrong = w.clone()
    wrong[1, 2] += 1e-3
    for jac, passes in ((w, True), (wrong, False)):
        problem = prepare(linear_cell(w, jac), torch.randn(2, 6, 4, dtype=F64), torch.zeros(2, 4, dtype=F64))
        states = problem.dyn.run(problem.s0, problem.xs)
        c = compare_jacobians(problem, states, problem.dyn, F64, eps=6e-6, rtol=1e-6, atol=1e-8)
        assert c.abs_error.shape == (2, 6) and c.columns_are_units
        assert (c.worst_ratio <= 1.0) == passes
        if not passes:
            assert c.worst[2:] == (1, 2)
            torch.testing.assert_close(c.abs_error, torch.full((2, 6), 1e-3, dtype=F64), atol=1e-8, rtol=0)


def test_compare_jacobians_directional_and_nan():
    w = torch.randn(4, 4, generator=gen(1), dtype=F64) * 0.5
    problem = prepare(linear_cell(w), torch.randn(2, 6, 4, dtype=F64), torch.zeros(2, 4, dtype=F64))
    states = problem.dyn.run(problem.s0, problem.xs)
    c = compare_jacobians(
        problem, states, problem.dyn, F64, eps=6e-6, rtol=1e-6, atol=1e-8, directions=2, generator=gen(0)
    )
    assert c.worst_ratio <= 1.0 and not c.columns_are_units and float(c.abs_error.max()) < 1e-8
    # a NaN in J v (not caught by the full check's materialised test) fails the comparison instead of passing
    nan_w = w.clone()
    nan_w[0, 0] = float("nan")
    problem = prepare(linear_cell(w, nan_w), torch.randn(2, 6, 4, dtype=F64), torch.zeros(2, 4, dtype=F64))
    c = compare_jacobians(
        problem, states, problem.dyn, F64, eps=6e-6, rtol=1e-6, atol=1e-8, directions=2, generator=gen(0)
    )
    assert c.worst_ratio == float("inf") and c.worst[2] == 0
