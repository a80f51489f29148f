"""input_output_penalty: exact against torch.autograd.functional.jacobian, unbiasedness, gradients, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import rnnjac._input_output as io_mod
from rnnjac._input_output import input_output_penalty
from rnnjac.errors import NonFiniteError

F64 = torch.float64


class LstmReadout(nn.Module):
    """(B, T, 3) -> (B, T, 2)."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.rnn = nn.LSTM(3, 5, batch_first=batch_first)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def mlp() -> nn.Module:  # (B, 4) -> (B, 3)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def cnn() -> nn.Module:  # images (B, 2, 5, 5) -> (B, 4)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 4), nn.Softplus()
    )


MODELS = {"mlp": (mlp, (4,)), "lstm_readout": (LstmReadout, (6, 3)), "cnn": (cnn, (2, 5, 5))}


def make(name: str, batch: int = 3, seed: int = 0):
    factory, shape = MODELS[name]
    torch.manual_seed(seed)
    model = factory().to(F64)
    x = torch.randn(batch, *shape, dtype=F64, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def reference(fn, x) -> torch.Tensor:
    """||dy_b/dx_b||_F^2 per sample, each sample's Jacobian by torch.autograd.functional.jacobian on its own."""
    return torch.stack(
        [torch.autograd.functional.jacobian(lambda xb: fn(xb[None])[0], x[b]).pow(2).sum() for b in range(len(x))]
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_equals_autograd_jacobian(name):
    model, x = make(name)
    got = input_output_penalty(model, x, estimator="exact", reduction="none")
    assert got.shape == (3,)
    torch.testing.assert_close(got, reference(model, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "lstm_readout"])
def test_exact_in_chunks(name, monkeypatch):
    """Forcing many small chunks of basis vectors (and of projections) changes nothing."""
    model, x = make(name)
    want = reference(model, x)
    monkeypatch.setattr(io_mod, "_CHUNK_ELEMENTS", 2 * x.shape[0] * model(x)[0].numel())  # chunks of 2
    torch.testing.assert_close(
        input_output_penalty(model, x, estimator="exact", reduction="none"), want, rtol=1e-10, atol=0
    )
    gen = torch.Generator().manual_seed(5)
    chunked = input_output_penalty(model, x, n_proj=5, generator=gen, reduction="none")
    monkeypatch.undo()
    whole = input_output_penalty(model, x, n_proj=5, generator=torch.Generator().manual_seed(5), reduction="none")
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("n_proj", [1, 3])
def test_projection_is_unbiased(name, n_proj):
    """Copies of one sample in a batch get independent projections: their mean is within 3 standard errors."""
    model, x = make(name)
    n = 3000
    xs = x[:1].expand(n, *x.shape[1:]).contiguous()
    draws = input_output_penalty(model, xs, n_proj=n_proj, generator=torch.Generator().manual_seed(7), reduction="none")
    exact = reference(model, x[:1])[0]
    se = draws.std() / n**0.5
    assert draws.std() > 0  # really random
    assert abs(draws.mean() - exact) < 3 * se, (float(draws.mean()), float(exact), float(se))


def test_projection_of_a_single_output_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).to(F64)
    x = torch.randn(5, 4, dtype=F64)
    torch.testing.assert_close(
        input_output_penalty(model, x, reduction="none"), reference(model, x), rtol=1e-12, atol=0
    )


def test_generator_reproducible():
    model, x = make("lstm_readout")
    a = input_output_penalty(model, x, generator=torch.Generator().manual_seed(3), reduction="none")
    b = input_output_penalty(model, x, generator=torch.Generator().manual_seed(3), reduction="none")
    c = input_output_penalty(model, x, generator=torch.Generator().manual_seed(4), reduction="none")
    assert torch.equal(a, b) and not torch.equal(a, c)


def _param_fn(model, name):
    """(f(w), w0): the model as a function of one parameter, for gradcheck."""
    params = dict(model.named_parameters())
    w0 = params[name].detach().clone().requires_grad_(True)
    return (lambda w: lambda x: functional_call(model, {**params, name: w}, (x,))), w0


@pytest.mark.parametrize("name,param", [("mlp", "0.weight"), ("lstm_readout", "rnn.weight_hh_l0")])
@pytest.mark.parametrize("estimator", ["exact", "projection"])
def test_gradcheck_wrt_parameters(name, param, estimator):
    model, x = make(name, batch=2)
    with_w, w0 = _param_fn(model, param)

    def f(w):
        gen = torch.Generator().manual_seed(1)  # the same projections at every evaluation
        return input_output_penalty(with_w(w), x, estimator=estimator, n_proj=2, generator=gen)

    assert torch.autograd.gradcheck(f, (w0,), eps=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name,param", [("mlp", "0.weight"), ("lstm_readout", "rnn.weight_ih_l0")])
def test_gradgradcheck_exact(name, param):
    model, x = make(name, batch=2)
    with_w, w0 = _param_fn(model, param)
    assert torch.autograd.gradgradcheck(
        lambda w: input_output_penalty(with_w(w), x, estimator="exact"), (w0,), eps=1e-6, atol=1e-5
    )


def test_gradcheck_wrt_inputs_that_require_grad():
    model, x = make("mlp", batch=2)
    assert torch.autograd.gradcheck(
        lambda xx: input_output_penalty(model, xx, estimator="exact", reduction="none"), (x.requires_grad_(True),)
    )


def test_training_gradient_matches_reference():
    """d/dtheta of the exact penalty equals that of the reference built with create_graph=True."""
    model, x = make("cnn")
    got = torch.autograd.grad(input_output_penalty(model, x, estimator="exact"), list(model.parameters()))
    ref = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda xb: model(xb[None])[0], x[b], create_graph=True).pow(2).sum()
            for b in range(len(x))
        ]
    ).mean()
    want = torch.autograd.grad(ref, list(model.parameters()))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("estimator", ["exact", "projection"])
def test_grad_untouched(estimator):
    model, x = make("lstm_readout")
    x.requires_grad_(True)
    model.head.weight.grad = torch.ones_like(model.head.weight)
    pen = input_output_penalty(model, x, estimator=estimator)
    assert pen.requires_grad
    assert torch.equal(model.head.weight.grad, torch.ones_like(model.head.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")
    assert x.grad is None


def test_reductions():
    model, x = make("mlp", batch=4)
    none = input_output_penalty(model, x, estimator="exact", reduction="none")
    assert none.shape == (4,)
    torch.testing.assert_close(input_output_penalty(model, x, estimator="exact"), none.mean())
    torch.testing.assert_close(input_output_penalty(model, x, estimator="exact", reduction="sum"), none.sum())


def test_value_under_no_grad_and_inference_mode():
    model, x = make("lstm_readout")
    want = input_output_penalty(model, x, estimator="exact")
    with torch.no_grad():
        got = input_output_penalty(model, x, estimator="exact")
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    with torch.inference_mode():
        xi = x.clone()  # an inference tensor
        got = input_output_penalty(model, xi, estimator="exact")
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    plain = input_output_penalty(model, x, estimator="exact", create_graph=False)
    assert not plain.requires_grad
    torch.testing.assert_close(plain, want, rtol=1e-12, atol=0)


def test_batch_of_one():
    model, x = make("cnn", batch=1)
    torch.testing.assert_close(
        input_output_penalty(model, x, estimator="exact", reduction="none"), reference(model, x), rtol=1e-10, atol=0
    )


def test_output_not_depending_on_input():
    model, x = make("mlp")
    with pytest.raises(ValueError, match="does not depend on its input"):
        input_output_penalty(lambda xx: model(torch.ones_like(xx)), x)  # parameters require grad, the input is unused
    with pytest.raises(ValueError, match="does not depend on its input"):
        input_output_penalty(lambda xx: torch.zeros(xx.shape[0], 3, dtype=F64), x)  # nothing requires grad
    with pytest.raises(ValueError, match="does not depend on its input"):
        input_output_penalty(lambda xx: model(xx.detach()), x, check_independence=False)


@pytest.mark.parametrize(
    "fn,match",
    [
        (lambda m, x: m(x).sum(), r"outputs must have a leading batch dimension of size 3.*got shape \(\)"),
        (lambda m, x: m(x)[:2], r"size 3.*got shape \(2, 3\)"),
        (lambda m, x: m(x).T, r"size 3.*got shape \(3, 3\)|mixes samples"),
        (lambda m, x: m(x)[:, :0], "at least one"),
    ],
)
def test_output_shape_errors(fn, match):
    model, x = make("mlp")
    with pytest.raises(ValueError, match=match):
        input_output_penalty(lambda xx: fn(model, xx), x)


def test_input_and_type_errors():
    model, x = make("mlp")
    with pytest.raises(ValueError, match=r"inputs must have a leading batch dimension.*got shape \(\)"):
        input_output_penalty(lambda xx: xx, torch.tensor(1.0))
    with pytest.raises(TypeError, match="inputs must be a real floating-point tensor; got dtype torch.int64"):
        input_output_penalty(model, torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor; got list"):
        input_output_penalty(model, [[1.0] * 4])
    with pytest.raises(TypeError, match=r"outputs must be a torch.Tensor; got tuple.*lambda x: model\(x\)\[0\]"):
        input_output_penalty(nn.LSTM(3, 4, batch_first=True).to(F64), torch.randn(2, 5, 3, dtype=F64))


def test_non_finite():
    model, x = make("mlp")
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="inputs contain NaN/Inf, first in sample b=2"):
        input_output_penalty(model, bad)
    scale = torch.tensor([1.0, float("inf"), 1.0], dtype=F64)[:, None]
    with pytest.raises(NonFiniteError, match="outputs contain NaN/Inf, first in sample b=1"):
        input_output_penalty(lambda xx: model(xx) * scale, x)
    with pytest.raises(NonFiniteError, match="penalty is NaN/Inf, first in sample b=0"):
        input_output_penalty(lambda xx: 1e160 * xx, x * 1e-170, estimator="exact")  # finite outputs, J^2 overflows


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"estimator": "jacrev"}, ValueError, "estimator must be one of 'projection', 'exact'; got 'jacrev'"),
        ({"n_proj": 0}, ValueError, "n_proj must be an integer >= 1; got 0"),
        ({"n_proj": True}, ValueError, "n_proj must be an integer >= 1; got True"),
        ({"n_proj": 2.0}, ValueError, "n_proj must be an integer >= 1; got 2.0"),
        ({"reduction": "max"}, ValueError, "reduction must be one of 'mean', 'sum', 'none'; got 'max'"),
        ({"generator": 3}, TypeError, r"generator must be a torch.Generator or None \(e.g. .*\); got int"),
        ({"create_graph": "yes"}, TypeError, "create_graph must be True or False"),
    ],
)
def test_bad_options(kwargs, exc, match):
    model, x = make("mlp")
    calls = []
    with pytest.raises(exc, match=match):
        input_output_penalty(lambda xx: calls.append(1) or model(xx), x, **kwargs)
    assert not calls  # refused before any work


def test_models_mixing_samples_are_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
    x = torch.randn(6, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"mixes samples.*sample 3 depend on the inputs of sample 0.*model.eval\(\)"):
        input_output_penalty(model, x)
    input_output_penalty(model, x, check_independence=False)  # the caller's choice: no error
    model.eval()  # per-sample again: matches the per-sample reference
    torch.testing.assert_close(
        input_output_penalty(model, x, estimator="exact", reduction="none"), reference(model, x), rtol=1e-10, atol=0
    )


def test_time_major_rnn_is_refused():
    torch.manual_seed(0)
    model = LstmReadout(batch_first=False).to(F64)
    x = torch.randn(4, 4, 3, dtype=F64)  # (T, B, I) with T == B: the leading dimension is not the batch
    with pytest.raises(ValueError, match="mixes samples.*batch_first=True"):
        input_output_penalty(model, x)


def test_no_repeat_of_inputs():
    """fn runs once per call on the caller's batch (no tiling), whatever n_proj or the estimator."""
    model, x = make("lstm_readout")
    seen = []

    def fn(xx):
        seen.append(xx.shape)
        return model(xx)

    input_output_penalty(fn, x, n_proj=4)
    input_output_penalty(fn, x, estimator="exact")
    assert seen == [x.shape, x.shape]


class _CudnnLikeFailure(torch.autograd.Function):
    """Identity whose backward fails as cuDNN's RNN backward does under create_graph=True."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError(
            "the derivative for '_cudnn_rnn_backward' is not implemented. Double backwards is not supported for "
            "CuDNN RNNs due to limitations in the CuDNN API."
        )


def test_cudnn_rnn_failure_is_explained():
    model, x = make("mlp")
    with pytest.raises(RuntimeError, match=r"fn runs a cuDNN RNN.*torch.backends.cudnn.flags\(enabled=False\)"):
        input_output_penalty(lambda xx: model(_CudnnLikeFailure.apply(xx)), x)


@pytest.mark.gpu
@pytest.mark.parametrize("train", [True, False])
def test_cuda_lstm_module_matches_cpu(train):
    """A CUDA module holding an LSTM runs without cuDNN: differentiable, vmappable, eval mode works."""
    model, x = make("lstm_readout")
    want = input_output_penalty(model, x, estimator="exact", reduction="none")
    cuda = model.to("cuda").train(train)
    for estimator in ("exact", "projection"):
        pen = input_output_penalty(cuda, x.cuda(), estimator=estimator, n_proj=2, reduction="none")
        grads = torch.autograd.grad(pen.sum(), list(cuda.rnn.parameters()))  # the training-time double backward
        assert all(bool(torch.isfinite(g).all()) for g in grads)
        if estimator == "exact":
            torch.testing.assert_close(pen.cpu(), want, rtol=1e-10, atol=1e-12)
    gen = torch.Generator("cuda").manual_seed(0)
    a = input_output_penalty(cuda, x.cuda(), generator=gen)
    assert a.device.type == "cuda" and torch.isfinite(a)
    assert torch.backends.cudnn.enabled  # restored
