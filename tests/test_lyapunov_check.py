"""The independent check of lambda_1 by direct simulation (``rnnjac._lyapunov_check``).

The simulation never touches a Jacobian, so it is an independent reference for the QR estimate: they must
agree on a chaotic and on a trained model, and a deliberately wrong closed-form Jacobian must make them disagree.
"""

from __future__ import annotations

import importlib.resources
import math

import pytest
import torch

import rnnjac
from rnnjac._checks import prepare
from rnnjac._lyapunov_check import _forward, verify_lyapunov
from rnnjac.tasks import flipflop


def chaotic_rnn(n=64, g=2.0, seed=0):
    """tanh RNN with W ~ N(0, g^2 / n), no input drive, no bias: chaotic for g = 2 (lambda_1 > 0)."""
    torch.manual_seed(seed)
    rnn = torch.nn.RNN(1, n, batch_first=True, bias=False)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)) * g / math.sqrt(n))
    return rnn


def test_chaotic_tanh_rnn_agrees():
    rnn = chaotic_rnn()
    h0 = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(1))
    check = verify_lyapunov(
        rnn, torch.zeros(8, 600, 1), h0, warmup=100, tangent_warmup=100, generator=torch.Generator().manual_seed(2)
    )
    assert check.qr > 0.05 and check.passed, check
    assert check.combined_stderr < 0.02  # a real test: the errors are small next to lambda_1
    assert check.dns_per_sample.shape == (8,) and check.attrs()["lyapunov_check_passed"] == 1


def test_bundled_gru_agrees():
    path = importlib.resources.files("rnnjac") / "data" / "flipflop_gru.safetensors"
    gru = rnnjac.load_checkpoint(path)
    x, _ = flipflop(8, 400, generator=torch.Generator().manual_seed(0))
    check = verify_lyapunov(gru, x, warmup=20, tangent_warmup=20, generator=torch.Generator().manual_seed(1))
    assert check.qr < 0 and check.passed, check


def tanh_cell(n=32, g=2.0, jac_scale=1.0):
    w = torch.randn(n, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * g / math.sqrt(n)

    def step(s, x):
        return torch.tanh(s @ w.T + x)

    def jac(s, x):
        return jac_scale * (1 - step(s, x) ** 2).unsqueeze(-1) * w

    return rnnjac.CustomCell(step, jacobian=jac)


@pytest.mark.parametrize("scale", [1.0, 1.3, 0.8])
def test_a_wrong_closed_form_jacobian_fails(scale):
    """The same custom cell with its true closed form passes; scaled by 1.3 or 0.8 (lambda_1 off by ln 1.3, ln 0.8)
    it fails."""
    x = torch.zeros(6, 500, 32, dtype=torch.float64)
    h0 = torch.randn(6, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    check = verify_lyapunov(
        tanh_cell(jac_scale=scale), x, h0, warmup=50, tangent_warmup=50, generator=torch.Generator().manual_seed(5)
    )
    assert check.passed == (scale == 1.0), check
    if scale != 1.0:
        assert check.difference == pytest.approx(-math.log(scale), abs=0.05)


def test_exact_collapse_agrees():
    """W_hh = 0: every separation vanishes after one step, and every QR growth is at the floor: both -inf."""
    rnn = torch.nn.RNN(2, 8, batch_first=True)
    with torch.no_grad():
        rnn.weight_hh_l0.zero_()
    check = verify_lyapunov(rnn, torch.randn(3, 40, 2))
    assert check.dns == float("-inf") and check.qr == float("-inf") and check.passed


def test_lstm_uses_the_module_forward_and_agrees():
    lstm = torch.nn.LSTM(2, 16, num_layers=2, batch_first=True)
    x = torch.randn(4, 300, 2, generator=torch.Generator().manual_seed(0))
    check = verify_lyapunov(lstm, x, warmup=20, tangent_warmup=20, generator=torch.Generator().manual_seed(1))
    assert check.passed, check
    problem = prepare(lstm, x, dtype=torch.float64)
    step, label = _forward(problem, prepare(lstm, x).dyn)
    assert label == "torch module forward"
    s = problem.s0 + torch.randn(problem.s0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.allclose(step(s, problem.xs[:, 0]), problem.dyn.step(s, problem.xs[:, 0]), atol=1e-12)


def test_options_are_checked():
    rnn = torch.nn.RNN(1, 4, batch_first=True)
    x = torch.zeros(2, 30, 1)
    with pytest.raises(ValueError, match="renorm_every must be"):
        verify_lyapunov(rnn, x, renorm_every=0)
    with pytest.raises(ValueError, match="delta must be"):
        verify_lyapunov(rnn, x, delta=2.0)
    with pytest.raises(ValueError, match="must fit in the T = 30"):
        verify_lyapunov(rnn, x, warmup=20)
    cell = rnnjac.CustomCell(lambda s, x: torch.tanh(s + x))
    with pytest.warns(rnnjac.RnnjacWarning, match="float64"):
        verify_lyapunov(cell, torch.zeros(2, 30, 3), torch.zeros(2, 3))


def test_the_pipeline_attrs_of_a_whole_model_equal_the_check_of_its_recurrent_core():
    """``lyapunov_check_attrs`` (what ``rnnjac analyze --model ... --check-lyapunov`` records) with a submodule: the
    same numbers as the check of the recurrent module fed what the model's first layer gives it."""
    from rnnjac._options import SpectraOptions
    from rnnjac._pipeline import lyapunov_check_attrs

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.GRU(3, 8, batch_first=True))
    x = torch.randn(3, 120, 2, generator=torch.Generator().manual_seed(1))
    attrs = lyapunov_check_attrs(net, x, None, SpectraOptions(warmup=10, tangent_warmup=10, seed=4), submodule="1")
    with torch.no_grad():
        ref = verify_lyapunov(
            net[1], net[0](x), warmup=10, tangent_warmup=10, generator=torch.Generator().manual_seed(4)
        )
    assert attrs["lyapunov_check_dns"] == pytest.approx(ref.dns, rel=1e-9, abs=1e-12)
    assert attrs["lyapunov_check_qr"] == pytest.approx(ref.qr, rel=1e-9, abs=1e-12)
    assert attrs["lyapunov_check_passed"] == int(ref.passed) == 1 and attrs["lyapunov_check_ci"] == 0.95
