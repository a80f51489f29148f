r"""The end-to-end input-to-output Jacobian penalty of any batched torch callable.

:func:`input_output_penalty` penalises, for every sample ``b`` of a batch, the squared Frobenius norm
``||dy_b/dx_b||_F^2`` of the Jacobian of the outputs ``y = fn(x)`` with respect to the inputs ``x``. Both
carry a leading batch dimension; the other dimensions are free (``(B, C)``, ``(B, T, O)`` from an RNN
with a readout, ``(B, C, H, W) -> (B, K)`` for a CNN...). ``O`` below is the number of output entries
of one sample, ``I`` the number of input entries of one sample.

**Projection estimator** (``estimator="projection"``, the default; Hoffman, Roberts & Yaida 2019,
"Robust learning with Jacobian regularization", arXiv:1908.02729). For ``v`` uniform on the unit
sphere of ``R^O``, ``E[v v^T] = I_O / O``, so ``E[O ||J^T v||^2] = tr(J J^T) = ||J||_F^2``: an unbiased
estimate from one reverse-mode pass, ``torch.autograd.grad(y, x, v)``. It is averaged over
``n_proj`` independent draws (its relative spread falls as ``1/sqrt(n_proj)``).

**Batches without a loop.** Sample ``b``'s outputs depend on sample ``b``'s inputs only, so the
Jacobian of the whole batch is block diagonal and a single backward pass with the cotangent
``(v_1, ..., v_B)`` (independent draws per sample) returns every ``J_b^T v_b`` at once, exactly: no
Python loop over samples or output entries. Several projections (``n_proj > 1``) and the exact mode's
basis vectors are several cotangents of the *same* graph, pushed through one vectorised backward
(``torch.autograd.grad(..., is_grads_batched=True)``, i.e. ``torch.func.vmap`` of the vector-Jacobian
product). The inputs are never tiled with ``.repeat()``: a tiled copy reruns the forward ``K`` times
(``K`` times the time and activation memory) and its graph starts at the copy, so unless the
derivative is taken with respect to that copy (and the copies summed back) it silently becomes
disconnected from the caller's inputs.

**Exact mode** (``estimator="exact"``): the ``O`` basis vectors ``e_k``, each applied to every sample
at once, give the rows of every ``J_b``; squared and summed, that is ``||J_b||_F^2`` to rounding.
It costs ``O`` backward passes, vectorised in chunks of up to 16 (larger chunks cost memory and made
the training-time double backward slower); with ``create_graph=True`` each keeps its graph until the
caller's backward, so memory grows with ``O``: meant for small outputs, and as the reference.

**Independence check.** Models that mix samples break the block-diagonal assumption: BatchNorm in
train mode, attention or pooling over the batch dimension, a time-major (``batch_first=False``) RNN
whose first dimension is time. With ``check_independence=True`` (default) one extra backward pass,
without a graph, pushes a random cotangent on the middle sample ``B // 2`` only; any non-zero derivative
reaching another sample's inputs raises a ``ValueError`` before the penalty is computed. (A model whose
middle sample alone happens to be independent of the others is not caught; the batch statistics,
batch pooling and time-major cases above all are.)

**cuDNN RNNs.** The fused cuDNN RNN kernel's backward cannot be differentiated again, vmapped or run in
eval mode. When ``fn`` is an ``nn.Module`` on CUDA that contains an ``nn.RNNBase`` (LSTM, GRU, RNN), its
forward runs with cuDNN disabled (PyTorch's native RNN kernels: slower, differentiable); for other
callables such a failure is re-raised with the fix (``torch.backends.cudnn.flags(enabled=False)``).

Gradients: the penalty is differentiable in ``fn``'s parameters (and in ``inputs`` when they require
grad) through ``create_graph=True``; it uses ``torch.autograd.grad`` only, never ``.backward()``, so no
``.grad`` changes until the caller backpropagates its loss.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ._checks import check_bool, check_generator
from .errors import NonFiniteError

__all__ = ["input_output_penalty"]

ESTIMATORS = ("projection", "exact")
REDUCTIONS = ("mean", "sum", "none")
_CHUNK_ELEMENTS = 2**24  # cotangent entries (chunk x batch x O) pushed through one vectorised backward
# at most this many cotangents per vectorised backward: with larger batches the training-time double backward
# through the vmapped graph got slower per cotangent (LSTM, B=32, T=20: 2.0 s with 16, 10.4 s with all 160)
_MAX_BATCHED = 16


def _check_options(estimator, n_proj, reduction, generator, create_graph, check_independence) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(map(repr, ESTIMATORS))}; got {estimator!r}")
    if isinstance(n_proj, bool) or not isinstance(n_proj, int) or n_proj < 1:
        raise ValueError(f"n_proj must be an integer >= 1; got {n_proj!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}; got {reduction!r}")
    check_generator(generator)
    check_bool("create_graph", create_graph)
    check_bool("check_independence", check_independence)


def _first_bad_sample(t: Tensor) -> int:
    return int(torch.nonzero(~torch.isfinite(t.detach()).reshape(t.shape[0], -1).all(1))[0, 0])


def _check_tensor(t, what: str, batch: int | None = None) -> None:
    """A floating-point tensor ``(B, ...)`` with finite entries and at least one entry per sample."""
    if not isinstance(t, Tensor):
        hint = " (a tuple: select the output tensor, e.g. lambda x: model(x)[0])" if isinstance(t, tuple) else ""
        raise TypeError(f"{what} must be a torch.Tensor; got {type(t).__name__}{hint}")
    if not t.is_floating_point():
        raise TypeError(
            f"{what} must be a real floating-point tensor; got dtype {t.dtype}"
            + (" (differentiate with respect to embeddings, not token ids)" if what == "inputs" else "")
        )
    if t.dim() == 0 or (batch is not None and t.shape[0] != batch):
        raise ValueError(
            f"{what} must have a leading batch dimension of size {batch if batch is not None else 'B'} "
            f"(shape (B, ...)); got shape {tuple(t.shape)}"
            + ("" if batch is None else ": fn must map inputs (B, ...) to outputs (B, ...), batch first")
        )
    if t.numel() == 0:
        raise ValueError(f"{what} must have at least one sample and one entry per sample; got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t.detach()).all()):
        raise NonFiniteError(f"{what} contain NaN/Inf, first in sample b={_first_bad_sample(t)}")


def _grad(y: Tensor, x: Tensor, cot: Tensor, *, batched: bool, create_graph: bool) -> Tensor:
    """``J^T cot`` (a batch of cotangents along dim 0 when ``batched``), refusing an ``x`` that ``y`` ignores."""
    (g,) = torch.autograd.grad(
        y, x, cot, retain_graph=True, create_graph=create_graph, allow_unused=True, is_grads_batched=batched
    )
    if g is None:
        raise _no_dependence()
    return g


def _no_dependence() -> ValueError:
    return ValueError(
        "fn's output does not depend on its input (PyTorch: 'One of the differentiated Tensors appears to not "
        "have been used in the graph'): fn must compute its outputs from the tensor it is given"
    )


def _check_independent(y: Tensor, x: Tensor) -> None:
    """One backward with a random cotangent on the middle sample ``m = B // 2`` only: no other sample's inputs
    may receive a derivative (the middle one has neighbours on both sides: causal and anti-causal leaks show)."""
    m = y.shape[0] // 2
    gen = torch.Generator().manual_seed(0)  # fixed and private: the caller's generator stream is not consumed
    cot = torch.zeros_like(y)
    cot[m] = torch.randn(y.shape[1:], generator=gen, dtype=torch.float64).to(dtype=y.dtype, device=y.device)
    g = _grad(y, x, cot, batched=False, create_graph=False)
    leaked = g.reshape(g.shape[0], -1).ne(0).any(1)
    leaked[m] = False
    if bool(leaked.any()):
        other = int(torch.nonzero(leaked)[0, 0])
        raise ValueError(
            f"fn mixes samples across the batch: the outputs of sample {m} depend on the inputs of sample {other}, "
            "so the per-sample Jacobians are not the blocks of one backward pass. Typical causes: BatchNorm in train "
            "mode (call model.eval()), attention or pooling over the batch dimension, a time-major RNN "
            "(use batch_first=True). check_independence=False skips this check, and the result is then not "
            "the per-sample Jacobian norm"
        )


def _cotangents(y: Tensor, estimator: str, n_proj: int, generator):
    """Chunks ``(K, *y.shape)`` of cotangents: the ``O`` basis vectors (exact) or ``n_proj`` unit draws."""
    b, o = y.shape[0], y[0].numel()
    count = o if estimator == "exact" else n_proj
    chunk = max(1, min(_MAX_BATCHED, _CHUNK_ELEMENTS // (b * o)))
    if estimator == "projection":
        dev = generator.device if generator is not None else y.device
        dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
        v = torch.randn(n_proj, b, o, generator=generator, device=dev, dtype=dtype)
        v = (v / v.norm(dim=-1, keepdim=True)).to(dtype=y.dtype, device=y.device)
    for k0 in range(0, count, chunk):
        k1 = min(count, k0 + chunk)
        if estimator == "exact":
            rows = torch.eye(o, dtype=y.dtype, device=y.device)[k0:k1]
            yield rows[:, None, :].expand(k1 - k0, b, o).reshape(k1 - k0, *y.shape)
        else:
            yield v[k0:k1].reshape(k1 - k0, *y.shape)


@contextlib.contextmanager
def _rnn_without_cudnn(fn, x: Tensor):
    """cuDNN's fused RNN backward can neither be differentiated (``create_graph=True``), vmapped, nor run in eval
    mode: the forward of a CUDA ``fn`` that is a module holding an ``nn.RNNBase`` runs with cuDNN disabled."""
    if not (x.is_cuda and isinstance(fn, nn.Module) and any(isinstance(m, nn.RNNBase) for m in fn.modules())):
        yield
        return
    enabled = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = enabled


@contextlib.contextmanager
def _explain_cudnn_rnn():
    try:
        yield
    except (RuntimeError, NotImplementedError) as err:
        text = str(err).lower()
        if "cudnn" not in text or "rnn" not in text:
            raise
        raise RuntimeError(
            "fn runs a cuDNN RNN, whose backward can be neither differentiated again (create_graph=True), vmapped "
            "(estimator='exact', n_proj > 1) nor run in eval mode. Pass the module itself as fn (rnnjac then runs "
            "its forward without cuDNN) or call input_output_penalty inside "
            "`with torch.backends.cudnn.flags(enabled=False):`"
        ) from err


def _penalty_per_sample(y, x, estimator, n_proj, generator, create_graph) -> Tensor:
    total = None
    for cot in _cotangents(y, estimator, n_proj, generator):
        if cot.shape[0] == 1:  # a single cotangent: a plain backward pass, no vmap
            sq = _grad(y, x, cot[0], batched=False, create_graph=create_graph).pow(2).reshape(x.shape[0], -1).sum(1)
        else:
            g = _grad(y, x, cot, batched=True, create_graph=create_graph)
            sq = g.pow(2).reshape(g.shape[0], x.shape[0], -1).sum((0, 2))
        total = sq if total is None else total + sq
    if estimator == "projection":
        total = total * (y[0].numel() / n_proj)
    return total


def input_output_penalty(
    fn,
    inputs: Tensor,
    *,
    estimator: str = "projection",
    n_proj: int = 1,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
    create_graph: bool = True,
    check_independence: bool = True,
) -> Tensor:
    """Per-sample squared Frobenius norm ``||dy_b/dx_b||_F^2`` of ``y = fn(x)``, differentiable.

    See the module docstring for the estimators and the batch-independence assumption.

    Parameters
    ----------
    fn : callable
        Differentiable torch callable ``inputs (B, ...) -> outputs (B, ...)`` returning one tensor (any
        trailing shapes), whose sample ``b`` depends on input sample ``b`` only. For a module returning a
        tuple, select the tensor: ``lambda x: lstm(x)[0]``.
    inputs : Tensor
        ``(B, ...)``, floating point. If they do not require grad, ``fn`` runs on a detached copy that
        does; if they do, the penalty is also differentiable with respect to them.
    estimator : {"projection", "exact"}
        ``"projection"``: unbiased random unit projections, ``n_proj`` backward passes. ``"exact"``:
        the full per-sample Jacobians (``O`` vectorised backward passes, ``O`` = entries of one sample's
        output), for small outputs.
    n_proj : int
        Random projections per sample (projection estimator), averaged.
    reduction : {"mean", "sum", "none"}
        Over the batch; ``"none"`` returns shape ``(B,)``.
    generator : torch.Generator, optional
        Seeds the projections (drawn on the generator's device).
    create_graph : bool
        Keep the graph through the Jacobian so the penalty can be trained on. Under the caller's
        ``torch.no_grad()`` or ``torch.inference_mode()`` the value is computed (grad enabled inside)
        and returned detached.
    check_independence : bool
        One extra backward pass (no graph) that refuses an ``fn`` mixing samples across the batch.

    Returns
    -------
    Tensor
        A scalar, or ``(B,)`` for ``reduction="none"``.

    Raises
    ------
    ValueError
        Bad options, outputs without the batch dimension, an output that does not depend on the input,
        an ``fn`` that mixes samples; ``NonFiniteError`` (a ``ValueError``) for NaN/Inf inputs, outputs
        or penalty.

    Examples
    --------
    >>> import torch
    >>> from rnnjac._input_output import input_output_penalty
    >>> lstm, readout = torch.nn.LSTM(3, 16, batch_first=True), torch.nn.Linear(16, 2)
    >>> fn = lambda x: readout(lstm(x)[0])  # (B, T, 3) -> (B, T, 2)
    >>> x = torch.randn(8, 20, 3)
    >>> loss = fn(x).pow(2).mean() + 1e-2 * input_output_penalty(fn, x, n_proj=2)
    >>> loss.backward()
    >>> exact = input_output_penalty(fn, x, estimator="exact", reduction="none")
    >>> exact.shape
    torch.Size([8])
    """
    _check_options(estimator, n_proj, reduction, generator, create_graph, check_independence)
    _check_tensor(inputs, "inputs")
    graph = create_graph and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    with torch.inference_mode(False), torch.enable_grad():
        x = inputs
        if inputs.is_inference():
            x = inputs.clone()  # an inference tensor cannot enter a graph; its clone outside inference mode can
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        with _rnn_without_cudnn(fn, x):
            y = fn(x)
        _check_tensor(y, "outputs", batch=x.shape[0])
        if not y.requires_grad:
            raise _no_dependence()
        with _explain_cudnn_rnn():
            if check_independence and x.shape[0] > 1:
                _check_independent(y, x)
            vals = _penalty_per_sample(y, x, estimator, n_proj, generator, graph)
    if not bool(torch.isfinite(vals.detach()).all()):
        raise NonFiniteError(f"the input-output penalty is NaN/Inf, first in sample b={_first_bad_sample(vals)}")
    vals = vals if graph else vals.detach()
    return vals.mean() if reduction == "mean" else vals.sum() if reduction == "sum" else vals
