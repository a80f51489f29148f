"""Small batched linear-algebra kernels used by the spectra and the penalties.

- :func:`qr_positive`: ``torch.linalg.qr`` with signs fixed so that ``diag(R) > 0``.
- :func:`cholesky_qr_diag`: one CholeskyQR pass (well-conditioned blocks only), with its failure flag.
- :func:`graded_log_svdvals`: log singular values of ``diag(exp(log_e)) K`` without forming it, for
  the end-to-end Jacobian kept as ``Q diag(e) K`` (see :class:`EndToEnd`).
- :func:`kaplan_yorke`: the Kaplan-Yorke dimension of sorted exponents.
- :func:`collapse_floor`: the rule that decides when a Lyapunov direction has collapsed.

Singular products (README "Conventions"). A direction of the end-to-end product ``J_t ... J_1`` that a
step maps exactly to zero is lost for good: its log singular value is ``-inf`` from that step on, and the
others stay finite. :class:`EndToEnd` keeps such directions as rows of zero scale (``log_e = -inf``):
rows of ``J_t Q`` that are exactly zero (dead ReLU units, saturated units whose derivative underflows,
zero weights) and exact zeros of the triangular factor are detected exactly; rank loss that shows only
as rounding noise is resolved to the working precision (the value then falls by ~37 nats per step in
float64 instead of reading ``-inf``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# singular values computed by svdvals carry an absolute error ~ u * sigma_max; values more than
# this many nats below the top are recomputed from a trailing block (relative error <= ~1e-8).
_RESOLVED_NATS = 18.0
_CLUSTER_NATS = 3.0  # rows whose scales differ by more are decoupled by the sweeps below
_ORDER_SLACK = 2.0  # row scales may be out of order by this many nats (the sweep stays exact)
_SWEEPS = 6  # coupling shrinks like exp(-6 * 3 nats) = 1.5e-8 between clusters


#: QR route per device type, chosen by measurement (figures/benchmark_gpu.md, analyses/gpu_check.py):
#: LAPACK Householder on the CPU; on CUDA, batched Householder QR of many small tall matrices is slow
#: and shifted CholeskyQR3 (three GEMM + Cholesky passes) is used for tall blocks.
QR_ROUTE = {"cpu": "householder", "cuda": "cholesky"}
#: Singular values of float32 matrices on CUDA: ``"gram64"`` takes ``sqrt(eigvalsh(J^T J))`` in float64,
#: measured 6x faster than cuSOLVER's batched SVD for 1024 x 1024 Jacobians on an H200 and more
#: accurate (1e-8 vs 2e-4 of sigma_1 for float32 gesvdj); float64 inputs keep LAPACK/cuSOLVER svdvals.
SVD_ROUTE = {"cpu": "svd", "cuda": "gram64"}
SVD_DRIVER: str | None = None


def _cholesky_qr(a: Tensor, shift: bool) -> tuple[Tensor, Tensor]:
    g = a.mT @ a
    if shift:
        m, n = a.shape[-2], a.shape[-1]
        u = torch.finfo(a.dtype).eps / 2
        s = 11 * (m * n + n * (n + 1)) * u * a.pow(2).sum((-2, -1), keepdim=True)
        g = g + s * torch.eye(n, dtype=a.dtype, device=a.device)
    r = torch.linalg.cholesky_ex(g)[0].mT
    q = torch.linalg.solve_triangular(r, a, upper=True, left=False)
    return q, r


def cholesky_qr_diag(a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One unshifted CholeskyQR pass of a tall ``a (..., m, n)``: ``G = a^T a = R^T R``, ``Q = a R^{-1}``.

    Returns ``(Q, diag R, column norms of a, failed)`` (``diag R > 0``) and ``failed`` a 0-dim
    bool tensor, true when a Cholesky factorisation broke down (``a`` numerically rank deficient). Half the cost
    of Householder QR (one Gram GEMM, a Cholesky and a triangular solve), but the relative error of ``R_ii`` and
    the loss of orthogonality of ``Q`` are about ``u cond(a)^2`` (Yamamoto, Nakatsukasa, Yanagisawa & Fukaya
    2015): use it only when ``a`` is known to be well conditioned, as :class:`rnnjac._lyapunov_qr.LyapunovQR`
    does (it checks the condition estimate of the result and else repeats the QR by Householder).

    Examples
    --------
    >>> a = torch.tensor([[3.0, 1.0], [4.0, 2.0]], dtype=torch.float64)
    >>> q, d, norms, failed = cholesky_qr_diag(a)
    >>> d.round(decimals=12).tolist(), norms.round(decimals=12).tolist(), bool(failed)
    ([5.0, 0.4], [5.0, 2.2360679775], False)
    """
    g = a.mT @ a
    r, info = torch.linalg.cholesky_ex(g, upper=True)
    # Q column-major, as Householder's: the next J Q reads it 1.5-2x faster (B = 8, D = 64, one thread)
    q = torch.linalg.solve_triangular(r, a, upper=True, left=False)
    norms = torch.diagonal(g, dim1=-2, dim2=-1).sqrt()
    return q, torch.diagonal(r, dim1=-2, dim2=-1), norms, (info != 0).any()


def cholesky_qr3(a: Tensor) -> tuple[Tensor, Tensor]:
    """Shifted CholeskyQR3 of a tall ``a (..., m, n)`` (Fukaya, Kannan, Nakatsukasa, Yamamoto & Yanagisawa 2020).

    One shifted CholeskyQR pass makes the factor well conditioned for any ``cond(a) < u^-1``; two
    plain passes then bring orthogonality to O(u). Returns ``(Q, R)`` with ``R`` upper triangular.
    """
    q, r1 = _cholesky_qr(a, shift=True)
    q, r2 = _cholesky_qr(q, shift=False)
    q, r3 = _cholesky_qr(q, shift=False)
    return q, r3 @ r2 @ r1


def qr(a: Tensor, route: str | None = None) -> tuple[Tensor, Tensor]:
    """Reduced QR by the route chosen for ``a``'s device (see :data:`QR_ROUTE`)."""
    route = route or QR_ROUTE.get(a.device.type, "householder")
    if route == "cholesky" and a.shape[-2] >= a.shape[-1]:
        return cholesky_qr3(a)
    return torch.linalg.qr(a)


def svdvals(a: Tensor) -> Tensor:
    """Singular values, descending, by the measured route for ``a``'s device and dtype."""
    if SVD_ROUTE.get(a.device.type) == "gram64" and a.dtype == torch.float32:
        a64 = a.double()
        ev = torch.linalg.eigvalsh(a64.mT @ a64).clamp_min(0).sqrt()
        return ev.flip(-1).to(a.dtype)
    if a.is_cuda and SVD_DRIVER is not None:
        return torch.linalg.svdvals(a, driver=SVD_DRIVER)
    return torch.linalg.svdvals(a)


def qr_positive(a: Tensor, route: str | None = None) -> tuple[Tensor, Tensor]:
    """Reduced QR of ``a (..., n, k)`` with ``diag(R) >= 0``; returns ``(Q, diag(R))``."""
    q, r = qr(a, route)
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    sign = torch.where(d < 0, -1.0, 1.0).to(d.dtype)
    if q.requires_grad or torch.is_inference_mode_enabled():
        return q * sign.unsqueeze(-2), d * sign
    return q.mul_(sign.unsqueeze(-2)), d * sign  # q is fresh from the QR: scale it in place


def qr_schedule(steps: int, warmup: int, tangent_warmup: int, reortho_every: int) -> dict[int, int]:
    """The steps t (1-based) after which the tangents are re-orthonormalised, each with the number of
    steps it covers.

    Tangents evolve from step ``warmup + 1``; a QR follows every ``reortho_every`` steps, at the end of
    the tangent transient (so that counting starts afresh) and at the last step. Steps after
    ``warmup + tangent_warmup`` are counted. (``reortho_every="auto"`` has no fixed schedule: the QR pass
    :class:`rnnjac._lyapunov_qr.LyapunovQR` decides online, keeping the same two QRs.)
    """
    out, since, start = {}, 0, warmup + tangent_warmup
    for t in range(warmup + 1, steps + 1):
        since += 1
        if since == reortho_every or t == steps or (t == start and tangent_warmup > 0):
            out[t] = since
            since = 0
    return out


def kaplan_yorke(exponents: Tensor) -> Tensor:
    """Kaplan-Yorke dimension of descending exponents ``(..., k)``.

    ``D_KY = j + (l_1 + ... + l_j) / |l_{j+1}|`` with ``j`` the largest index whose partial sum is
    non-negative; 0 when ``l_1 < 0``; ``k`` when every partial sum is non-negative (with only the
    top-k exponents known this is then a lower bound). Collapsed directions (``-inf``, see
    :func:`collapse_floor`) contract infinitely fast: ``l_{j+1} = -inf`` adds nothing to ``j``, so only
    the finite exponents contribute, and the result is never NaN.

    Examples
    --------
    >>> import torch
    >>> from rnnjac._linalg import kaplan_yorke
    >>> kaplan_yorke(torch.tensor([0.5, -1.0, float("-inf")])).item()
    1.5
    """
    csum = torch.cumsum(exponents, -1)
    k = exponents.shape[-1]
    j = (csum >= 0).to(torch.int64).cumprod(-1).sum(-1)  # leading non-negative partial sums
    s_j = torch.gather(csum, -1, (j - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nxt = torch.gather(exponents, -1, j.clamp(max=k - 1).unsqueeze(-1)).squeeze(-1).abs()
    inside = (j > 0) & (j < k)
    # where(...) alone would still divide 0/0 in the unused branch: keep that branch finite
    frac = torch.where(inside, s_j / torch.where(inside, nxt, torch.ones_like(nxt)), torch.zeros_like(s_j))
    return j.to(exponents.dtype) + frac


#: log2 of the per-step relative growth below which a Lyapunov direction counts as collapsed (times
#: sqrt(D)); 2**-22 is four times float32's unit round-off, see :func:`collapse_floor`.
COLLAPSE_LOG2 = -22


def collapse_floor(block_norm: Tensor, size: int, steps: int) -> Tensor:
    """Log of the smallest QR growth ``R_ii`` that counts as resolved, the same rule in every dtype.

    A QR of ``J Q`` covering ``steps`` steps resolves ``R_ii`` down to about ``u sqrt(D) ||J Q||_F``
    (``u`` the unit round-off): in float32 an exactly singular step (a saturated tanh or sigmoid
    unit, whose derivative underflows to 0 once ``|a| > 9``, a dead ReLU unit) leaves ``R_ii`` at that
    noise level, while float64 resolves the same direction's true, tiny growth. To count the same
    ``-inf`` exponents in both dtypes, an exponent whose growth was at or below
    ``||J Q||_F (2**-22 sqrt(D))**steps`` (four times float32's noise per step) at *every* counted QR is
    ``-inf`` (the exact limit of a direction that collapses); in any other direction an exact zero at
    one QR contributes this floor instead of ``log 0``, and every other growth its own log.
    ``block_norm`` is ``||J Q||_F`` per sample, ``(B,)``; returns ``(B, 1)``.

    Examples
    --------
    >>> import torch
    >>> from rnnjac._linalg import collapse_floor
    >>> round(collapse_floor(torch.tensor([1.0]), 16, 1).item(), 3)  # log(2**-22 * 4)
    -13.863
    """
    per_step = COLLAPSE_LOG2 * math.log(2.0) + 0.5 * math.log(size)
    return (torch.log(block_norm) + steps * per_step).unsqueeze(-1)


def _lq_sweep(log_e: Tensor, k_mat: Tensor) -> Tensor:
    """One sweep ``E K = E L Q' -> E (L~)^T``: same singular values, off-diagonal coupling shrunk.

    ``K = L Q'`` (LQ, i.e. QR of ``K^T``); then ``E L = L~ E`` with ``L~_ij = L_ij e_i / e_j``
    (bounded for ordered scales, and decaying like ``e_i / e_j`` below the diagonal), and
    ``sigma(L~ E) = sigma(E L~^T)`` with ``L~^T`` upper triangular. This is one step of the
    unshifted QR algorithm in graded form: coupling between rows i < j decays by ``e_j / e_i``.
    """
    _, r = torch.linalg.qr(k_mat.transpose(-1, -2))
    ratio = (log_e.unsqueeze(-1) - log_e.unsqueeze(-2)).clamp(max=_ORDER_SLACK)  # [i, j] = log e_i - log e_j
    return torch.triu(r * torch.exp(ratio.transpose(-1, -2)))


def graded_log_svdvals(log_e: Tensor, k_mat: Tensor) -> Tensor:
    """Log singular values (descending) of ``diag(exp(log_e)) @ K`` for ``(B, n)``, ``(B, n, m)``.

    When the values span less than 18 nats this is one float64-accurate batched ``svdvals`` (the
    smallest carries a relative error below 1e-8). Wider spreads (long products) would lose the
    small values to round-off, so the graded form is first decoupled by :func:`_lq_sweep` (each
    sweep shrinks the coupling of rows whose scales differ by g nats by a factor exp(-g)); rows are
    then grouped into clusters whose neighbouring scales are within 3 nats, and each cluster's
    block is handled by ``svdvals`` (an isolated row contributes ``log e_i + log |K_ii|``). Values in
    a cluster that itself spans more than 18 nats (early transients of large chaotic models) are
    accurate for its top members only. Rows of zero scale (``log_e = -inf``) give exact ``-inf``
    values, the others finite ones.

    Examples
    --------
    >>> import torch
    >>> from rnnjac._linalg import graded_log_svdvals
    >>> log_e = torch.tensor([[900.0, 0.0, float("-inf")]], dtype=torch.float64)
    >>> graded_log_svdvals(log_e, torch.eye(3, dtype=torch.float64)[None]).tolist()
    [[900.0, 0.0, -inf]]
    """
    dead = torch.isneginf(log_e)
    if bool(dead.any()):
        return _with_dead_rows(log_e, k_mat, dead)
    top = log_e.max(-1, keepdim=True).values
    logs = torch.log(torch.linalg.svdvals(torch.exp(log_e - top).unsqueeze(-1) * k_mat)) + top
    spread = torch.nonzero((logs[:, 0] - logs[:, -1]) > _RESOLVED_NATS).flatten()
    if len(spread) == 0:
        return logs
    le, km = log_e[spread], k_mat[spread]
    # the sweeps need ordered scales: rows that are not (the QR ordering has not yet set in) are sorted
    # first, which leaves the singular values unchanged
    unordered = (le[:, 1:] > le[:, :-1] + _ORDER_SLACK).any(-1)
    if bool(unordered.any()):
        order = torch.argsort(le, dim=-1, descending=True, stable=True)
        order = torch.where(unordered.unsqueeze(-1), order, torch.arange(le.shape[-1], device=le.device))
        le = torch.gather(le, -1, order)
        km = torch.gather(km, -2, order.unsqueeze(-1).expand_as(km))
    for _ in range(_SWEEPS):
        km = _lq_sweep(le, km)
    diag = torch.diagonal(km, dim1=-2, dim2=-1).abs()
    approx = le + torch.log(diag)
    for row, b in enumerate(spread.tolist()):
        logs[b] = _clustered(le[row], km[row], approx[row])
    return logs


def _with_dead_rows(log_e: Tensor, k_mat: Tensor, dead: Tensor) -> Tensor:
    """Zero rows contribute exact zero singular values; the others come from the live rows alone."""
    out = torch.full_like(log_e, float("-inf"))
    for b in range(log_e.shape[0]):
        live = torch.nonzero(~dead[b]).flatten()
        if len(live):
            out[b, : len(live)] = graded_log_svdvals(log_e[b, live][None], k_mat[b, live][None])[0]
    return out


def _clustered(log_e: Tensor, k_mat: Tensor, approx: Tensor) -> Tensor:
    gaps = (log_e[:-1] - log_e[1:]) > _CLUSTER_NATS
    bounds = [0] + (torch.nonzero(gaps).flatten() + 1).tolist() + [log_e.shape[0]]
    out = approx.clone()
    for a, b in zip(bounds[:-1], bounds[1:], strict=False):
        if b - a > 1:
            top = log_e[a]
            # float64 so that a cluster spanning more than float32's ~87 nats keeps its small rows
            block = torch.exp(log_e[a:b].double() - top.double()).unsqueeze(-1) * k_mat[a:b, a:b].double()
            vals = torch.log(torch.linalg.svdvals(block)).to(out.dtype) + top
            # a value lost to round-off inside a very wide cluster falls back on its graded estimate
            out[a:b] = torch.where(torch.isfinite(vals), vals, torch.sort(approx[a:b], descending=True).values)
    return torch.sort(out, descending=True).values


class EndToEnd:
    """The product ``P_t = J_t ... J_1`` kept as ``Q diag(exp(log_e)) K`` (no overflow).

    ``Q`` is orthogonal, ``K`` upper triangular with unit-norm rows, ``log_e`` the row scales. An
    update ``J P = (J Q) E K = Q' R E K = Q' E (E^-1 R E) K`` keeps every factor O(1): the entries
    ``R_ij e_j / e_i`` (i < j) are bounded once the scales are ordered, which the QR ordering gives.

    A direction lost exactly (see the module docstring) is a row with ``log_e = -inf``; ``R`` is then
    made to have a zero *row* there (:func:`_deflate`), so the loss is exact and permanent.
    """

    def __init__(self, batch: int, n: int, dtype, device):
        self.q = torch.eye(n, dtype=dtype, device=device).expand(batch, n, n).clone()
        self.k = self.q.clone()
        self.log_e = torch.zeros(batch, n, dtype=dtype, device=device)

    def update(self, jq: Tensor) -> None:
        """``jq = J_t @ Q`` (the caller applies ``J_t`` to :attr:`q`, structured or not)."""
        lim = math.log(torch.finfo(jq.dtype).max) / 2
        le = self.log_e
        finite = torch.isfinite(le)
        ratio = le.unsqueeze(-2) - torch.where(finite, le, 0.0).unsqueeze(-1)  # [i, j] = log e_j - log e_i
        q, r = torch.linalg.qr(jq)
        k = torch.triu(r * torch.exp(ratio.clamp(max=lim))) @ self.k  # (E^-1 R E) K
        norms = k.norm(dim=-1)
        # rows the scaled product handles as is: finite scale, no ratio beyond the clamp, a usable norm
        plain = finite & ~(torch.triu(ratio) > lim).any(-1) & (norms > 0) & torch.isfinite(norms)
        zero_rows = (jq == 0).all(-1)
        zero_diag = torch.diagonal(r, dim1=-2, dim2=-1) == 0  # a direction lost exactly: deflate it below
        if not bool(torch.cat([zero_rows, ~plain, zero_diag], -1).any()):  # one host sync per step
            self.k = k / norms.unsqueeze(-1)
            self.log_e = le + torch.log(norms)
            self.q = q
            return
        q, r = _qr_zero_rows_last(jq, zero_rows)
        r = r.masked_fill(~finite.unsqueeze(-2), 0.0)  # columns that multiply rows of zero scale
        if bool((torch.diagonal(r, dim1=-2, dim2=-1) == 0).any()):
            q, r = _deflate(q, r)
        self._scaled_product(q, r, ratio, plain, lim)

    def _scaled_product(self, q: Tensor, r: Tensor, ratio: Tensor, plain: Tensor, lim: float) -> None:
        """``R E K = E' K'`` with each row scaled by ``e_i`` (plain rows) or by its largest term."""
        lower = torch.ones_like(r, dtype=torch.bool).tril(-1)
        log_terms = (torch.log(r.abs()) + self.log_e.unsqueeze(-2)).masked_fill(lower, float("-inf"))
        top = log_terms.max(-1).values
        ref = torch.where(plain, self.log_e, torch.where(torch.isfinite(top), top, 0.0))
        g_plain = torch.triu(r * torch.exp(ratio.clamp(max=lim)))
        g_big = torch.sign(r) * torch.exp(log_terms - ref.unsqueeze(-1))
        k = torch.where(plain.unsqueeze(-1), g_plain, g_big) @ self.k
        norms = k.norm(dim=-1)
        zero = norms == 0
        eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device).expand_as(k)
        self.k = torch.where(zero.unsqueeze(-1), eye, k / torch.where(zero, 1.0, norms).unsqueeze(-1))
        self.log_e = torch.where(zero, float("-inf"), ref + torch.log(norms))
        self.q = q

    def log_singular_values(self) -> Tensor:
        return graded_log_svdvals(self.log_e, self.k)


def _qr_zero_rows_last(a: Tensor, zero_rows: Tensor) -> tuple[Tensor, Tensor]:
    """QR of ``a`` whose exactly-zero rows are moved to the bottom first, so that Householder keeps them
    exactly zero: ``R`` then has exact zeros where ``a`` loses rank through zero rows."""
    order = torch.argsort(zero_rows.to(torch.int8), dim=-1, stable=True)  # nonzero rows first, in order
    q, r = torch.linalg.qr(torch.gather(a, -2, order.unsqueeze(-1).expand_as(a)))
    inverse = torch.argsort(order, dim=-1)
    return torch.gather(q, -2, inverse.unsqueeze(-1).expand_as(q)), r


def _deflate(q: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate the rows of ``R`` (and the columns of ``Q``, so that ``Q R`` is unchanged) until every zero
    diagonal entry has a zero row: then each lost direction is one row of zero scale.

    Row i with ``R_ii = 0`` is appended below the triangular block ``R[i+1:, i+1:]``; the complete QR of
    that ``(n - i) x (n - i - 1)`` matrix leaves its last row zero, which becomes row i.
    """
    q, r = q.clone(), r.clone()
    n = r.shape[-1]
    for b in torch.nonzero((torch.diagonal(r, dim1=-2, dim2=-1) == 0).any(-1)).flatten().tolist():
        for i in range(n - 1):
            if bool(r[b, i, i] != 0) or not bool((r[b, i, i + 1 :] != 0).any()):
                continue
            rows = list(range(i + 1, n)) + [i]
            u, t = torch.linalg.qr(r[b, rows, i + 1 :], mode="complete")
            r[b, rows, i + 1 :] = t
            r[b, i, i + 1 :] = 0.0
            q[b][:, rows] = q[b][:, rows] @ u
    return q, r
