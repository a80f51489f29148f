r"""The elementwise passes of the built-in cells' linearisations, as plain functions of tensors, and their optional
``torch.compile`` versions (the ``compile=True`` option of the penalties); the LSTM cell-state recurrence as a scan.

Every function here is elementwise over ``(N, H)`` blocks (plus a per-row ``(H, K, K)`` Gram matrix that broadcasts
over ``N``): eager PyTorch runs each operator as one pass over memory, while ``torch.compile`` (Inductor) fuses a
whole function, forward and backward, into a few loops. The formulas are those of :mod:`rnnjac._cells` (GRU: Cho
et al. 2014; LSTM: Hochreiter & Schmidhuber 1997 with the forget gate of Gers et al. 2000, PyTorch's gate order).

Compiling costs time once per function and input layout (tens of seconds on a CPU, where Inductor builds C++; the
first call pays it, later calls with new sizes may recompile once with dynamic shapes), and the compiled graphs are
differentiable once only (no double backward). :func:`elementwise` falls back to the eager function, with one
:class:`~rnnjac.errors.RnnjacWarning` per process, where ``torch.compile`` is missing or fails.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .errors import RnnjacWarning

__all__ = [
    "elementwise",
    "entry_first",
    "graph_vjp",
    "gru_coefs",
    "gru_gate_coefs",
    "lstm_coefs",
    "quadratic_rows",
    "gru_rows",
    "gru_gate_rows",
    "gru_pre_rows",
    "gru_gate_rows_vjp",
    "lstm_rows",
    "lstm_gate_rows",
    "lstm_pre_rows",
    "lstm_gate_rows_vjp",
    "linear_recurrence",
]


def gru_coefs(gi: Tensor, gh: Tensor, h: Tensor) -> tuple[Tensor, ...]:
    """``(z, a_z, a_n, a_hn, a_r)`` of a GRU step from its pre-activations ``gi, gh (N, 3H)`` and state ``h (N, H)``
    (the coefficients of ``dh'``, :mod:`rnnjac._cells`).

    Examples
    --------
    >>> z, a_z, a_n, a_hn, a_r = gru_coefs(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 1))
    >>> z.item(), a_z.item(), a_n.item()
    (0.5, 0.25, 0.5)
    """
    gi_r, gi_z, gi_n = gi.chunk(3, -1)
    gh_r, gh_z, gh_n = gh.chunk(3, -1)
    r = torch.sigmoid(gi_r + gh_r)
    z = torch.sigmoid(gi_z + gh_z)
    n = torch.tanh(gi_n + r * gh_n)
    a_n = (1 - z) * (1 - n * n)
    return z, (h - n) * z * (1 - z), a_n, a_n * r, a_n * gh_n * r * (1 - r)


def gru_gate_coefs(r: Tensor, z: Tensor, n: Tensor, gh_n: Tensor, h: Tensor) -> tuple[Tensor, ...]:
    """:func:`gru_coefs` from the activated gates ``r, z, n`` and ``gh_n = W_hn h + b_hn`` the forward kept
    (:func:`rnnjac._recurrence.gru_layer`): no pre-activation to recompute.

    Examples
    --------
    >>> half, zero, one = torch.full((1, 1), 0.5), torch.zeros(1, 1), torch.ones(1, 1)
    >>> [t.item() for t in gru_gate_coefs(half, half, zero, zero, one)]
    [0.5, 0.25, 0.5, 0.25, 0.0]
    """
    a_n = (1 - z) * (1 - n * n)
    return z, (h - n) * z * (1 - z), a_n, a_n * r, a_n * gh_n * r * (1 - r)


def lstm_coefs(i: Tensor, f: Tensor, g: Tensor, o: Tensor, c: Tensor, c_new: Tensor) -> tuple[Tensor, ...]:
    """``(s_i, s_f, s_g, f, s_o, s_m)`` of an LSTM step from its activated gates, cell state ``c`` and next cell
    state ``c_new`` (all ``(N, H)``; the coefficients of ``dc'`` and ``dm``, :mod:`rnnjac._cells`).

    Examples
    --------
    >>> half, zero = torch.full((1, 1), 0.5), torch.zeros(1, 1)
    >>> [t.item() for t in lstm_coefs(half, half, zero, half, zero, zero)]
    [0.0, 0.0, 0.5, 0.5, 0.0, 0.5]
    """
    tc = torch.tanh(c_new)
    return g * i * (1 - i), c * f * (1 - f), i * (1 - g * g), f, tc * o * (1 - o), o * (1 - tc * tc)


def entry_first(gram: Tensor) -> Tensor:
    """A row Gram ``(H, K, K)`` as ``(K, K, H)``, contiguous: the layout of :func:`quadratic_rows`.

    Examples
    --------
    >>> entry_first(torch.arange(8.0).view(2, 2, 2))[0, 1].tolist()  # entry (0, 1) of each row's 2x2 Gram
    [1.0, 5.0]
    """
    return gram.permute(1, 2, 0).contiguous()


def quadratic_rows(xs: list[Tensor], gram: Tensor) -> Tensor:
    """``sum_{k,m} x_k G[k, m] x_m`` per element ``(..., H)``, as plain operators (autograd derives the backward;
    the eager default is :func:`rnnjac._cells.row_quadratic`'s hand-written one). ``gram`` is given entry-first,
    ``(K, K, H)``: each ``G[k, m]`` is then a contiguous row that broadcasts over the leading dimensions (a compiled
    kernel loads it as a vector; the row-first ``(H, K, K)`` layout would be a strided gather per element).

    Examples
    --------
    >>> quadratic_rows([torch.ones(1, 2), 2 * torch.ones(1, 2)], torch.eye(2).unsqueeze(-1).expand(2, 2, 2)).tolist()
    [[5.0, 5.0]]
    """
    q = xs[0] * _gram_row(gram, 0, xs)
    for k in range(1, len(xs)):
        q.addcmul_(xs[k], _gram_row(gram, k, xs))
    return q


def gru_rows(a_r: Tensor, a_z: Tensor, a_hn: Tensor, z: Tensor, gram: Tensor) -> Tensor:
    """``||J||_F^2`` per step ``(...)`` of one GRU layer from its coefficients ``(..., H)`` and the bordered row
    Gram, entry-first ``(4, 4, H)`` (:meth:`rnnjac._cells.GRUArch.frobenius_sq`)."""
    return quadratic_rows([a_r, a_z, a_hn, z], gram).sum(-1)


def gru_gate_rows(r: Tensor, z: Tensor, n: Tensor, gh_n: Tensor, h: Tensor, gram: Tensor) -> Tensor:
    """:func:`gru_rows` straight from the forward's gates (:func:`gru_gate_coefs`): one function, so that
    ``torch.compile`` fuses the coefficients, the row form and their backward into a few loops.

    Examples
    --------
    >>> half, zero, one = torch.full((1, 1), 0.5), torch.zeros(1, 1), torch.ones(1, 1)
    >>> gru_gate_rows(half, half, zero, zero, one, torch.eye(4).unsqueeze(-1)).tolist()  # 0.25^2 + 0.25^2 + 0.5^2
    [0.375]
    """
    z_, a_z, _, a_hn, a_r = gru_gate_coefs(r, z, n, gh_n, h)
    return gru_rows(a_r, a_z, a_hn, z_, gram)


def gru_pre_rows(pre: Tensor, h: Tensor, gram: Tensor) -> Tensor:
    """:func:`gru_gate_rows` from the pre-activations ``pre (..., 4H)`` (blocks r, z, hidden n ``W_hn h + b_hn``,
    input n ``W_in x + b_in``: :class:`rnnjac._recurrence.LayerRecord`) and the state ``h``: the gates are recomputed
    (a few flops in a fused kernel), so the gradient is the one by the pre-activations that the layer's backward
    takes as it is.

    Examples
    --------
    >>> gru_pre_rows(torch.zeros(1, 4), torch.ones(1, 1), torch.eye(4).unsqueeze(-1)).tolist()  # r = z = 1/2, n = 0
    [0.375]
    """
    pre_r, pre_z, gh_n, gi_n = pre.chunk(4, -1)
    r, z = torch.sigmoid(pre_r), torch.sigmoid(pre_z)
    return gru_gate_rows(r, z, torch.tanh(gi_n + r * gh_n), gh_n, h, gram)


def lstm_rows(s_i, s_f, s_g, f, s_o, s_m, gram: Tensor) -> Tensor:
    """``||J||_F^2`` per step ``(...)`` of one LSTM layer without projection from its coefficients and the row Gram
    of ``W_hh``'s gate blocks, entry-first ``(4, 4, H)`` (:meth:`rnnjac._cells.LSTMArch.frobenius_sq`)."""
    quad = quadratic_rows([s_i, s_f, s_g], gram[:3, :3]) + f * f
    lin_o = s_i * gram[0, 3] + s_f * gram[1, 3] + s_g * gram[2, 3]
    return ((1 + s_m * s_m) * quad + s_o * (2 * s_m * lin_o + s_o * gram[3, 3])).sum(-1)


def lstm_gate_rows(i: Tensor, f: Tensor, g: Tensor, o: Tensor, c: Tensor, c_new: Tensor, gram: Tensor) -> Tensor:
    """:func:`lstm_rows` straight from the forward's activated gates and cell states (:func:`lstm_coefs`), as one
    function for ``torch.compile``.

    Examples
    --------
    >>> half, zero = torch.full((1, 1), 0.5), torch.zeros(1, 1)
    >>> lstm_gate_rows(half, half, zero, half, zero, zero, torch.eye(4).unsqueeze(-1)).tolist()
    [0.625]
    """
    return lstm_rows(*lstm_coefs(i, f, g, o, c, c_new), gram)


def lstm_pre_rows(pre: Tensor, c: Tensor, c_new: Tensor, gram: Tensor) -> Tensor:
    """:func:`lstm_gate_rows` from the pre-activations ``pre (..., 4H)`` (i, f, g, o) and the cell states, the
    gates recomputed (as :func:`gru_pre_rows`).

    Examples
    --------
    >>> zero = torch.zeros(1, 1)
    >>> lstm_pre_rows(torch.zeros(1, 4), zero, zero, torch.eye(4).unsqueeze(-1)).tolist()
    [0.625]
    """
    pre_i, pre_f, pre_g, pre_o = pre.chunk(4, -1)
    i, f, o = torch.sigmoid(pre_i), torch.sigmoid(pre_f), torch.sigmoid(pre_o)
    return lstm_gate_rows(i, f, torch.tanh(pre_g), o, c, c_new, gram)


def _gram_row(gram: Tensor, k: int, a: list[Tensor]) -> Tensor:
    """``sum_m G[k, m] a_m`` (a fresh tensor: the in-place accumulation is the eager mode's saving, and
    ``torch.compile`` traces it as the same sum)."""
    acc = a[0] * gram[k, 0]
    for m in range(1, len(a)):
        acc.addcmul_(a[m], gram[k, m])
    return acc


def _pair_sums(w: Tensor, a: list[Tensor]) -> list[list[Tensor]]:
    """``sum w a_k a_m`` over every leading dimension, ``(H,)`` each, for ``k <= m``; the lower triangle mirrors
    it."""
    lead = tuple(range(a[0].dim() - 1))
    wa = [w * t for t in a]
    size = len(a)
    out: list[list] = [[None] * size for _ in range(size)]
    for k in range(size):
        for m in range(k, size):
            out[k][m] = out[m][k] = (wa[k] * a[m]).sum(lead)
    return out


def gru_gate_rows_vjp(w: Tensor, r: Tensor, z: Tensor, n: Tensor, gh_n: Tensor, h: Tensor, gram: Tensor):
    """The backward of :func:`gru_gate_rows` by the *pre-activations*: for row weights ``w (...)``, the gradients
    ``(dpre, dh (..., H), dgram (4, 4, H))`` of ``sum w * gru_gate_rows(...)``, with ``dpre`` the four blocks
    ``(..., H)`` (r, z, hidden n, input n) of :class:`rnnjac._recurrence.LayerRecord` (``n = tanh(gi_n + r gh_n)``,
    ``r, z = sigmoid(.)``): the chain rule through the coefficient formulas, written out, so that the gates'
    values are reused and no activation is recomputed. ``gram`` is symmetric, entry-first ``(4, 4, H)``.

    Examples
    --------
    >>> r, z, n, gh, h = (torch.rand(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(5))
    >>> gram = torch.eye(4, dtype=torch.float64).unsqueeze(-1).expand(4, 4, 3)
    >>> dpre, dh, _ = gru_gate_rows_vjp(torch.ones(2, dtype=torch.float64), r, z, n, gh, h, gram)
    >>> want = torch.autograd.grad(gru_gate_rows(r, z, n, gh, h, gram).sum(), h)[0]
    >>> bool(torch.allclose(dh, want))
    True
    """
    omz, dtanh, sig_r = 1 - z, 1 - n * n, r * (1 - r)
    sig_z, a_n = z * omz, omz * dtanh
    a = [a_n * gh_n * sig_r, (h - n) * sig_z, a_n * r, z]  # a_r, a_z, a_hn, z
    w = w.unsqueeze(-1)
    w2 = 2 * w
    d_r, d_z, d_hn, d_4 = (_gram_row(gram, k, a).mul_(w2) for k in range(4))
    d_an = d_hn * r + d_r * gh_n * sig_r
    dh = d_z * sig_z
    e_n = (-2 * n * omz * d_an - dh) * dtanh
    e_hn = e_n * r + d_r * a_n * sig_r
    e_r = (d_hn * a_n + d_r * a_n * gh_n * (1 - 2 * r) + e_n * gh_n) * sig_r
    e_z = (d_4 - d_an * dtanh + d_z * (h - n) * (1 - 2 * z)) * sig_z
    sums = _pair_sums(w, a)
    return (e_r, e_z, e_hn, e_n), dh, torch.stack([torch.stack(row) for row in sums])


def lstm_gate_rows_vjp(w: Tensor, i: Tensor, f: Tensor, g: Tensor, o: Tensor, c: Tensor, c_new: Tensor, gram: Tensor):
    """The backward of :func:`lstm_gate_rows` by the pre-activations (i, f, g, o), as :func:`gru_gate_rows_vjp`:
    ``(dpre (four blocks), dc (..., H), dc_new (..., H), dgram (4, 4, H))`` (the row form reads ``gram[k, 3]`` for
    ``k < 3`` and not ``gram[3, k]``: ``dgram[3, :3]`` is zero).

    Examples
    --------
    >>> i, f, g, o, c, cn = (torch.rand(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(6))
    >>> gram = torch.eye(4, dtype=torch.float64).unsqueeze(-1).expand(4, 4, 3)
    >>> _, dc, dcn, _ = lstm_gate_rows_vjp(torch.ones(2, dtype=torch.float64), i, f, g, o, c, cn, gram)
    >>> want = torch.autograd.grad(lstm_gate_rows(i, f, g, o, c, cn, gram).sum(), (c, cn))
    >>> bool(torch.allclose(dc, want[0])), bool(torch.allclose(dcn, want[1]))
    (True, True)
    """
    tc = torch.tanh(c_new)
    sig_i, sig_f, sig_o, dtanh_g, dtanh_c = i * (1 - i), f * (1 - f), o * (1 - o), 1 - g * g, 1 - tc * tc
    s = [g * sig_i, c * sig_f, i * dtanh_g]
    s_o, s_m = tc * sig_o, o * dtanh_c
    gs = [_gram_row(gram, k, s) for k in range(3)]
    quad = s[0] * gs[0] + s[1] * gs[1] + s[2] * gs[2] + f * f
    lin_o = s[0] * gram[0, 3] + s[1] * gram[1, 3] + s[2] * gram[2, 3]
    w = w.unsqueeze(-1)
    w_quad, w_lin = w * (1 + s_m * s_m), 2 * w * s_m * s_o  # d rows / d quad, d rows / d lin_o
    d_so = 2 * w * (s_m * lin_o + s_o * gram[3, 3])
    d_sm = 2 * w * (s_m * quad + s_o * lin_o)
    d_s = [2 * w_quad * gs[k] + w_lin * gram[k, 3] for k in range(3)]
    e_i = (d_s[0] * g * (1 - 2 * i) + d_s[2] * dtanh_g) * sig_i
    e_f = (d_s[1] * c * (1 - 2 * f) + 2 * w_quad * f) * sig_f
    e_g = (d_s[0] * sig_i - 2 * d_s[2] * i * g) * dtanh_g
    e_o = (d_so * tc * (1 - 2 * o) + d_sm * dtanh_c) * sig_o
    dc_new = (d_so * sig_o - 2 * d_sm * o * tc) * dtanh_c
    lead = tuple(range(s_o.dim() - 1))
    sums = _pair_sums(w_quad, s)
    zero = torch.zeros_like(s_o[(0,) * len(lead)])
    top = [[*sums[k], (w_lin * s[k]).sum(lead)] for k in range(3)]
    dgram = torch.stack(
        [torch.stack(row) for row in top] + [torch.stack([zero, zero, zero, (w * s_o * s_o).sum(lead)])]
    )
    return (e_i, e_f, e_g, e_o), d_s[1] * sig_f, dc_new, dgram


def _cell_update(f: Tensor, c: Tensor, ig: Tensor) -> Tensor:
    """The LSTM cell-state update ``c' = f c + i g``, with ``ig = i * g`` already formed."""
    return f * c + ig


def linear_recurrence(f: Tensor, u: Tensor, c0: Tensor, method: str | None = None) -> Tensor:
    """``c_0..c_T`` ``(B, T+1, H)`` of ``c_t = f_t c_{t-1} + u_t`` (:func:`_cell_update`) for ``f, u (B, T, H)``.

    ``method="loop"`` runs the ``T`` updates in order (the default on the CPU, where it measured fastest).
    ``method="scan"`` (the default on a GPU, where a loop of ``T`` small kernels is bound by their launches) is a
    doubling scan (Hillis & Steele 1986) of the affine maps ``c -> f_t c + u_t``: ``ceil(log2 T)`` rounds of two
    passes over ``(B, T, H)`` each, so about 35 kernels for ``T = 200`` forward and as many backward (the
    gradient is the same recurrence run backwards in time, :class:`_LinearScan`) instead of ~400 for a loop.
    Only products and sums of the ``f`` themselves are formed (no division, no logarithm), so it is as safe as
    the loop for forget gates at 0 or 1; it differs from the loop by the order of float additions.

    Examples
    --------
    >>> f, u = torch.full((1, 5, 1), 0.5), torch.ones(1, 5, 1)
    >>> linear_recurrence(f, u, torch.zeros(1, 1), method="scan").flatten().tolist()
    [0.0, 1.0, 1.5, 1.75, 1.875, 1.9375]
    """
    if method is None:
        method = "scan" if f.is_cuda else "loop"
    if method == "scan":
        return _LinearScan.apply(f, u, c0)
    if method != "loop":
        raise ValueError(f"method must be 'loop' or 'scan'; got {method!r}")
    cs, c = [c0], c0
    for f_t, u_t in zip(f.unbind(1), u.unbind(1), strict=True):  # unbind: one backward op, not T selects
        c = _cell_update(f_t, c, u_t)
        cs.append(c)
    return torch.stack(cs, 1)


def _doubling_scan(f: Tensor, u: Tensor, c0: Tensor) -> Tensor:
    """The forward of :class:`_LinearScan`: after the round with offset ``d`` the pair ``(a_t, v_t)`` is the
    composition of the maps of steps ``t-2d+1..t`` (fewer at the start), so ``c_t = a_t c_0 + v_t`` at the end."""
    steps = f.shape[1]
    a, v, d = f, u, 1
    while d < steps:
        v = torch.cat([v[:, :d], torch.addcmul(v[:, d:], a[:, d:], v[:, :-d])], 1)
        if 2 * d < steps:  # the products are not needed after the last round
            a = torch.cat([a[:, :d], a[:, d:] * a[:, :-d]], 1)
        d *= 2
    a = torch.cumprod(f, 1)  # the full prefix products, for the start
    return torch.cat([c0.unsqueeze(1), torch.addcmul(v, a, c0.unsqueeze(1))], 1)


class _LinearScan(torch.autograd.Function):
    """``c_0..c_T`` of ``c_t = f_t c_{t-1} + u_t`` by :func:`_doubling_scan`, with the gradient as the same scan
    backwards in time: ``G_t = g_t + f_{t+1} G_{t+1}`` (``G_T = g_T``), then ``dL/du_t = G_t``,
    ``dL/df_t = G_t c_{t-1}``, ``dL/dc_0 = g_0 + f_1 G_1``. The backward calls this Function again, so it is
    differentiable in turn (double backward); the forward-mode tangent is the scan of
    ``df_t c_{t-1} + du_t`` from ``dc_0``; ``torch.func`` transforms (``vmap``, ``grad``, ``jvp``) work on it,
    except forward-over-forward (``jacfwd(jacfwd(...))``): torch hands a custom Function's ``jvp`` its saved
    tensors without the outer tangent, so second derivatives taken that way are wrong (reverse-over-reverse,
    forward-over-reverse and reverse-over-forward are exact)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(f: Tensor, u: Tensor, c0: Tensor) -> Tensor:
        return _doubling_scan(f, u, c0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        f = inputs[0]
        ctx.save_for_backward(f, output)
        ctx.save_for_forward(f, output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        f, c = ctx.saved_tensors
        need_f, need_u, need_c0 = ctx.needs_input_grad
        if f.shape[1] == 0:  # no step: c_0 is the only output
            return None, None, grad[:, 0] if need_c0 else None
        # reversed time: G'_s = f'_s G'_{s-1} + g_{T+1-s} with G'_0 = 0, f'_s = f_{T+2-s} (f'_1 multiplies 0)
        f_rev = torch.cat([torch.zeros_like(f[:, :1]), f[:, 1:].flip(1)], 1)
        big_g = _LinearScan.apply(f_rev, grad[:, 1:].flip(1), torch.zeros_like(c[:, 0]))[:, 1:].flip(1)
        grad_f = big_g * c[:, :-1] if need_f else None
        grad_c0 = torch.addcmul(grad[:, 0], f[:, 0], big_g[:, 0]) if need_c0 else None
        return grad_f, big_g if need_u else None, grad_c0

    @staticmethod
    def jvp(ctx, df, du, dc0):
        f, c = ctx.saved_tensors
        drive = du if du is not None else torch.zeros_like(f)
        if df is not None:
            drive = drive + df * c[:, :-1]
        return _LinearScan.apply(f, drive, dc0 if dc0 is not None else torch.zeros_like(c[:, 0]))


def graph_vjp(outputs_of, inputs: tuple, grads: tuple, wanted: list[int] | None = None) -> tuple:
    """The gradients of ``outputs_of(*inputs)`` (a tensor or a tuple of them) against ``grads`` by the inputs
    ``wanted`` (default: every tensor input that requires grad), as a differentiable graph (``create_graph=True``):
    an autograd Function's double backward by autograd through a plain reference of its forward. None for the other
    inputs and where an output's gradient is None."""
    if wanted is None:
        wanted = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    with torch.enable_grad():
        outs = outputs_of(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None]
        got = torch.autograd.grad(
            [o for o, _ in pairs],
            [inputs[i] for i in wanted],
            [g for _, g in pairs],
            create_graph=True,
            allow_unused=True,
        )
    out = [None] * len(inputs)
    for i, g in zip(wanted, got, strict=True):
        out[i] = g
    return tuple(out)


_COMPILED: dict = {}  # by fn, or (fn, key) for a keyed copy
_FAILED: dict = {}


def _fallback(slot, fn: Callable, err: BaseException) -> Callable:
    """Record that ``slot`` (``fn`` or ``(fn, key)``) runs eagerly from now on; warn the first time only (one
    warning per process)."""
    first = not _FAILED
    _FAILED[slot] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    if first:
        warnings.warn(
            f"compile=True: torch.compile could not compile {fn.__name__} ({_FAILED[slot]}); the elementwise passes "
            "that do not compile run eagerly (same values, no fusion) from now on",
            RnnjacWarning,
            stacklevel=4,
        )
    return fn


def _own_copy(fn: Callable) -> Callable:
    """``fn`` with a code object of its own: dynamo keeps compiled code, guards and the recompile budget per code
    object, so each copy has its own (its profile of automatic dynamic shapes is keyed by file, line and name, so
    copies share that one: keyed copies are compiled with static sizes)."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__qualname__, copy.__kwdefaults__ = fn.__qualname__, fn.__kwdefaults__
    return copy


def elementwise(fn: Callable, compile: bool, *, key=None) -> Callable:  # noqa: A002
    """``fn`` itself (``compile=False``), or its ``torch.compile`` version that falls back to ``fn``, with one
    warning, where compiling is not possible (no ``torch.compile``, no C++ compiler, an unsupported platform or
    any error while compiling). Without ``key`` compiled with symbolic sizes (``dynamic=True``). With ``key``
    (hashable): a separate copy of ``fn`` per key (:func:`_own_copy`), compiled with static sizes
    (``dynamic=False``): :func:`rnnjac._penalties.fused` keys the functions of whole linearisations by the model's
    structure, as they slice by layout sizes, and a layout size made symbolic (by ``dynamic=True``, or by automatic
    dynamic shapes once a second model's sizes differ) trips a dynamo bug on stacked models.

    Examples
    --------
    >>> elementwise(gru_coefs, False) is gru_coefs
    True
    """
    if not compile:
        return fn
    slot = fn if key is None else (fn, key)
    if slot in _FAILED:
        return fn
    if slot not in _COMPILED:
        try:
            compiled = torch.compile(fn, dynamic=True) if key is None else torch.compile(_own_copy(fn), dynamic=False)
        except Exception as err:  # noqa: BLE001  (no compiler for this platform/Python: any reason falls back)
            return _fallback(slot, fn, err)
        _COMPILED[slot] = compiled

    def run(*args):
        if slot in _FAILED:
            return fn(*args)
        try:
            return _COMPILED[slot](*args)
        except Exception as err:  # noqa: BLE001  (a compile error surfaces at the first call)
            _fallback(slot, fn, err)
            return fn(*args)

    return run
