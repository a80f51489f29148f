r"""Uncertainty and convergence of Lyapunov exponents estimated from finite trajectories (tensor kernels).

Inputs are what the Lyapunov QR pass returns (:class:`rnnjac._lyapunov_qr.LyapunovResult`): the per-sample exponents
``(B, k)`` and either the local exponents ``(B, T, k)``, ``log R_ii / m`` at each counted QR step (a QR every ``m``
steps covers ``m`` steps) and NaN elsewhere (warm-up, tangent warm-up, steps between QRs), or their streamed
summary :class:`BlockStats` (what the spectra use: memory independent of T, see below).

**How the error is estimated.** The estimate of exponent i is the mean over the samples of their exponents. Two
estimates of its variance are formed:

(a) *between trajectories*: ``V_a = s_b^2 / B`` with ``s_b^2`` the sample variance of the B per-sample exponents
    (Student-t with ``B - 1`` degrees of freedom). It assumes only that the samples are independent, and it sees
    genuine differences between samples (different inputs, different attractors).
(b) *over time* (batch means): each sample's sequence of counted local exponents is cut into ``M``
    non-overlapping blocks of ``L`` consecutive QRs (the remainder joins the last block). The block means, centred
    on their own sample's mean, are pooled over all samples: ``s_w^2 = sum_{b,j} (m_bj - m_b)^2 / (B (M - 1))``
    and ``V_b = s_w^2 / (B M)`` (``B (M - 1)`` degrees of freedom). Block means are nearly independent once
    ``L`` is well beyond the correlation time of the local exponents, so ``V_b`` handles the autocorrelation of
    one long trajectory and works for ``B = 1``.

Under homogeneity (every sample has the same exponents) both estimate the same variance, and they are pooled
(one-way analysis of variance, "sometimes pool"): ``V = (df_a V_a + df_b V_b) / (df_a + df_b)`` with
``df_a + df_b`` degrees of freedom. When the samples differ beyond their time noise (one-sided F-test
``V_a / V_b`` at level :data:`POOL_LEVEL`), (a) alone is used: it is then the honest error of the mean over this
population of samples. With ``B = 1`` only (b) exists, with fewer than two blocks per sample only (a); with
neither, the error and the bounds are NaN. The interval is ``mean -/+ t_q * stderr`` with the Student-t quantile
of the degrees of freedom used. Samples must be independent (different ``h0`` or inputs): identical copies of
one trajectory make (a) zero and (b) too small.

**Block length.** Per exponent, ``L = max(floor(sqrt(n)), ceil(10 tau))`` QRs, capped at ``n // 2`` (two blocks
per sample), with n the counted QRs per sample and ``tau`` the integrated autocorrelation time of the local
exponents (Sokal's automatic window on the autocorrelation function pooled over samples,
:func:`autocorrelation_time`). Blocks of ten correlation times are nearly independent, and batch means then
underestimate the variance by about ``tau / L``; the cap keeps a (wide, few degrees of freedom) estimate for
short runs.

**Streaming (memory).** The local exponents are not kept: :class:`BlockAccumulator` sums ``log R_ii`` over base
blocks of ``base`` consecutive QRs and keeps at most :data:`MAX_BLOCKS` of them per sample and exponent; when
that many are full, neighbouring pairs are merged and ``base`` doubles. Memory is therefore ``B k MAX_BLOCKS``
float64 numbers (4 KiB per sample and exponent) whatever T, and up to ``MAX_BLOCKS - 1`` counted QRs
(``base = 1``) the result is the same as from the full local exponents. With ``base > 1`` the block length is a
multiple of ``base`` and ``tau`` is estimated from the base-block series: ``tau = tau_B * base * var_B / var_1``
with ``tau_B`` the autocorrelation time of the base-block means (in blocks), ``var_B`` their variance and
``var_1`` the variance of single local exponents (from a streamed sum of squares). This is exact for
``base = 1`` and tends to ``tau`` both for ``base << tau`` and ``base >> tau``.

**Kaplan-Yorke dimension and entropy** are functions of the whole mean spectrum (the point estimate is the
function of the mean exponents). Their errors come from a seeded bootstrap of the same two kinds: (a) resampling
the samples' exponent vectors, (b) resampling the pooled, centred block means (one block length for all
exponents: the largest chosen). The larger standard error wins, with the percentile interval of its bootstrap
(slightly conservative next to the pooled rule of the exponents).

Exponents that are ``-inf`` (collapsed, see the README's "How to read the outputs") in every sample get
``mean = lower = upper = -inf`` and error 0; ``-inf`` in some samples only gives ``mean = -inf``, NaN error and
bounds ``(-inf, largest sample value)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from scipy import stats
from torch import Tensor

from ._linalg import kaplan_yorke

#: block length in units of the integrated autocorrelation time (batch means then underestimate the variance by
#: about 10% for an AR(1) sequence; less for shorter memory)
BLOCK_TAUS = 10.0
#: level of the F-test that decides whether the samples differ beyond their time noise (then (a) alone is used)
POOL_LEVEL = 0.05

__all__ = [
    "BlockAccumulator",
    "BlockStats",
    "Convergence",
    "Uncertainty",
    "blocks_from_local",
    "convergence",
    "lyapunov_uncertainty",
]


class Estimate(NamedTuple):
    """One quantity's estimate: ``mean``, ``stderr`` and the ``lower``/``upper`` interval bounds (same shape)."""

    mean: Tensor
    stderr: Tensor
    lower: Tensor
    upper: Tensor


class Uncertainty(NamedTuple):
    """What :func:`lyapunov_uncertainty` returns (float64 tensors)."""

    exponents: Estimate
    """``(k,)`` each."""
    kaplan_yorke: Estimate
    """0-dim each."""
    entropy: Estimate
    """0-dim each: the sum of the positive exponents."""
    block_length: Tensor
    """``(k,)`` int64: QRs per block in (b) (0: fewer than two blocks per sample)."""
    method: Tensor
    """``(k,)`` int64: which estimate gave the error: 0 (a) between trajectories alone, 1 (b) the time blocks
    alone, 2 both pooled."""
    ci: float


class Convergence(NamedTuple):
    """What :func:`convergence` returns: per exponent ``(k,)``."""

    converged: Tensor
    """bool: the drift of the running mean over the last ``fraction`` is within ``threshold`` of its error."""
    drift: Tensor
    """running estimate at the end minus at the start of the last ``fraction`` of the counted steps."""
    stderr: Tensor
    """standard error of the final estimate, from the last ``fraction`` of the run (see :func:`convergence`)."""
    more_steps: Tensor
    """int64: steps likely still needed (0 when converged), assuming a transient bias that decays like 1/n."""


def counted_values(local: Tensor) -> tuple[Tensor, Tensor]:
    """The counted local exponents ``(B, n, k)`` (NaN columns dropped) and their time indices ``(n,)`` (0-based)."""
    kept = ~torch.isnan(local).all(dim=(0, 2))
    return local[:, kept].to(torch.float64), torch.nonzero(kept).flatten()


def _weights(index: Tensor) -> Tensor:
    """Steps covered by each counted QR: the gap to the previous one (the first covers as much as the second)."""
    if index.numel() < 2:
        return torch.ones(index.numel(), dtype=torch.float64)
    gaps = torch.diff(index).to(torch.float64)
    return torch.cat([gaps[:1], gaps])


class BlockStats(NamedTuple):
    """The streamed summary of the local exponents (module docstring, "Streaming"); float64, on the CPU."""

    sums: Tensor
    """``(B, M, k)``: per block, the sum over its QRs of ``log R_ii`` (local exponent times steps covered)."""
    steps: Tensor
    """``(M,)``: steps covered by each block."""
    sumsq: Tensor
    """``(B, k)``: the sum over all counted QRs of ``steps * local^2`` (the variance of single local exponents)."""
    base: int
    """QRs per block (the last block may hold fewer)."""
    qrs: int
    """Counted QRs per sample, n."""
    var1: Tensor | None = None
    """``(k,)``: the variance of single local exponents when set (a slice keeps that of the whole run)."""

    def single_variance(self) -> Tensor:
        """``(k,)``: the step-weighted variance of single local exponents within a sample, pooled over samples."""
        if self.var1 is not None:
            return self.var1
        w = self.steps.sum()
        return ((self.sumsq - self.sums.sum(1).square() / w) / w).mean(0)

    def slice(self, start: int) -> BlockStats:
        """The blocks from ``start`` on (the single-exponent variance stays that of the whole run)."""
        n = self.qrs - start * self.base
        return BlockStats(self.sums[:, start:], self.steps[start:], self.sumsq, self.base, n, self.single_variance())

    def sorted(self, order: Tensor) -> BlockStats:
        """Exponents reordered per sample by ``order (B, k)``."""
        sums = torch.gather(self.sums, -1, order.unsqueeze(1).expand(-1, self.sums.shape[1], -1))
        return self._replace(sums=sums, sumsq=torch.gather(self.sumsq, -1, order), var1=None)


#: at most this many blocks are kept per sample and exponent (then neighbouring pairs merge)
MAX_BLOCKS = 512


def _base_for(n: int, max_blocks: int = MAX_BLOCKS) -> int:
    """The block size :class:`BlockAccumulator` ends with after ``n`` QRs: the least power of two leaving fewer
    than ``max_blocks`` blocks."""
    base = 1
    while -(-n // base) >= max_blocks:
        base *= 2
    return base


class BlockAccumulator:
    """Streams ``log R_ii`` into :class:`BlockStats` (memory ``B k MAX_BLOCKS`` float64, independent of T).

    Call :meth:`add` at every counted QR (no host synchronisation), then :meth:`result`.

    Examples
    --------
    >>> acc = BlockAccumulator(1, 1, max_blocks=4)
    >>> for _ in range(10):
    ...     acc.add(torch.ones(1, 1), 1)
    >>> r = acc.result()
    >>> r.base, r.steps.tolist(), r.sums[0, :, 0].tolist()
    (4, [4.0, 4.0, 2.0], [4.0, 4.0, 2.0])
    """

    def __init__(self, batch: int, k: int, device=None, *, max_blocks: int = MAX_BLOCKS):
        self.max_blocks, self.base, self.m = max_blocks, 1, 0
        self.sums = torch.zeros(batch, max_blocks, k, dtype=torch.float64, device=device)
        self.steps: list[float] = []
        self.cur = torch.zeros(batch, k, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(batch, k, dtype=torch.float64, device=device)
        self.cur_n, self.cur_steps, self.qrs = 0, 0.0, 0

    def add(self, log_r: Tensor, cover: float) -> None:
        """One counted QR: ``log_r (B, k)`` (the log growths over ``cover`` steps)."""
        log_r = log_r.to(torch.float64)
        self.cur += log_r
        self.sumsq += log_r.square() / cover
        self.cur_n, self.cur_steps, self.qrs = self.cur_n + 1, self.cur_steps + cover, self.qrs + 1
        if self.cur_n == self.base:
            self._push()

    def _push(self) -> None:
        self.sums[:, self.m] = self.cur
        self.steps.append(self.cur_steps)
        self.m += 1
        self.cur.zero_()
        self.cur_n, self.cur_steps = 0, 0.0
        if self.m == self.max_blocks:  # merge neighbouring pairs, double the block size
            half = self.max_blocks // 2
            self.sums[:, :half] = self.sums[:, 0::2] + self.sums[:, 1::2]
            self.sums[:, half:] = 0
            self.steps = [self.steps[2 * i] + self.steps[2 * i + 1] for i in range(half)]
            self.m, self.base = half, 2 * self.base

    def result(self) -> BlockStats:
        """The summary so far (the unfinished block, if any, joins as a last, shorter block)."""
        if self.cur_n:
            self._push()
        steps = torch.tensor(self.steps, dtype=torch.float64)
        return BlockStats(self.sums[:, : self.m].cpu(), steps, self.sumsq.cpu(), self.base, self.qrs)


def blocks_from_local(local: Tensor, max_blocks: int = MAX_BLOCKS) -> BlockStats:
    """The :class:`BlockStats` that streaming the local exponents ``(B, T, k)`` would give (each counted QR
    weighted by the gap to the previous one)."""
    values, index = counted_values(local.detach().cpu())
    weights = _weights(index)
    b, n, k = values.shape
    base = _base_for(n, max_blocks)
    m = -(-n // base)
    ids = torch.arange(n) // base
    sums = torch.zeros(b, m, k, dtype=torch.float64).index_add_(1, ids, values * weights[:, None])
    steps = torch.zeros(m, dtype=torch.float64).index_add_(0, ids, weights)
    sumsq = (values.square() * weights[:, None]).sum(1)
    return BlockStats(sums, steps, sumsq, base, n)


def _as_blocks(local) -> BlockStats:
    return local if isinstance(local, BlockStats) else blocks_from_local(local)


def _grouped_means(stats: BlockStats, length: int) -> Tensor:
    """Means ``(B, M', k)`` of groups of ``length`` consecutive blocks (the remainder joins the last group)."""
    m = stats.steps.numel()
    groups = m // length
    ids = torch.clamp(torch.arange(m) // length, max=groups - 1)
    sums = torch.zeros(stats.sums.shape[0], groups, stats.sums.shape[2], dtype=torch.float64)
    sums.index_add_(1, ids, stats.sums)
    return sums / torch.zeros(groups, dtype=torch.float64).index_add_(0, ids, stats.steps)[:, None]


def autocorrelation_time(values: Tensor, window: float = 5.0) -> Tensor:
    """Integrated autocorrelation time ``(k,)`` of ``values (B, n, k)`` (in QRs) by Sokal's automatic window.

    The autocorrelation function is centred within each sample and pooled over samples (FFT, zero-padded);
    ``tau(W) = 1 + 2 sum_{t=1..W} rho(t)`` at the smallest ``W >= window * tau(W)``.
    """
    b, n, k = values.shape
    c = values - values.mean(1, keepdim=True)
    f = torch.fft.rfft(c, n=2 * n, dim=1)
    acf = torch.fft.irfft(f * f.conj(), n=2 * n, dim=1)[:, :n].sum(0)
    rho = acf / acf[:1].clamp(min=1e-300)
    tau = 1 + 2 * torch.cumsum(rho[1:], 0)  # tau(W) for W = 1..n-1
    lags = torch.arange(1, n, dtype=torch.float64)[:, None]
    stop = lags >= window * tau
    first = torch.where(stop.any(0), stop.to(torch.int64).argmax(0), torch.full((k,), n - 2))
    out = tau.gather(0, first.clamp(min=0)[None])[0] if n >= 2 else torch.ones(k, dtype=torch.float64)
    return out.clamp(min=1.0)


def _stream_tau(stats: BlockStats) -> Tensor:
    """``tau (k,)`` in QRs from the base-block series (module docstring, "Streaming")."""
    full = stats.sums[:, : stats.qrs // stats.base] if stats.base > 1 else stats.sums
    means = full / stats.steps[: full.shape[1], None]
    tau = autocorrelation_time(means)
    if stats.base == 1:
        return tau
    b, m, _ = means.shape
    var_b = ((means - means.mean(1, keepdim=True)) ** 2).sum((0, 1)) / (b * max(m - 1, 1))
    factor = stats.base * var_b / stats.single_variance().clamp(min=1e-300)
    return (tau * factor).clamp(min=1.0)


def choose_block_length(stats: BlockStats) -> Tensor:
    """Per exponent ``(k,)``: the block length of (b) in QRs (module docstring), a multiple of ``stats.base``;
    0 when fewer than two blocks fit."""
    n, m, k = stats.qrs, stats.steps.numel(), stats.sums.shape[2]
    if m < 2:
        return torch.zeros(k, dtype=torch.int64)
    tau = _stream_tau(stats)
    length = torch.clamp(torch.ceil(BLOCK_TAUS * tau), min=max(1, math.isqrt(n)), max=n // 2)
    length = torch.where(torch.isfinite(tau), length, torch.full_like(length, n // 2))
    blocks = torch.clamp(torch.ceil(length / stats.base), min=1, max=m // 2)
    return (blocks * stats.base).to(torch.int64)


def _time_variance(stats: BlockStats, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """``V_b (k,)`` and its degrees of freedom ``(k,)`` (NaN / 0 where no block length fits)."""
    b, _, k = stats.sums.shape
    var = torch.full((k,), float("nan"), dtype=torch.float64)
    dof = torch.zeros(k, dtype=torch.float64)
    for length in lengths.unique().tolist():
        if length == 0:
            continue
        sel = lengths == length
        blocks = _grouped_means(stats._replace(sums=stats.sums[..., sel]), length // stats.base)
        m = blocks.shape[1]
        within = ((blocks - blocks.mean(1, keepdim=True)) ** 2).sum((0, 1)) / (b * (m - 1))
        var[sel], dof[sel] = within / (b * m), float(b * (m - 1))
    return var, dof


def _combine(var_a: Tensor, dof_a: Tensor, var_b: Tensor, dof_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(variance, degrees of freedom, method)`` from (a) and (b) by the pooling rule of the module docstring."""
    both = ~torch.isnan(var_a) & ~torch.isnan(var_b)
    crit = torch.from_numpy(stats.f.ppf(1 - POOL_LEVEL, dof_a.clamp(min=1).numpy(), dof_b.clamp(min=1).numpy()))
    differ = both & (var_a > crit * var_b)
    pooled = (dof_a * var_a + dof_b * var_b) / (dof_a + dof_b)
    var = torch.where(both & ~differ, pooled, torch.where(torch.isnan(var_b) | differ, var_a, var_b))
    dof = torch.where(both & ~differ, dof_a + dof_b, torch.where(torch.isnan(var_b) | differ, dof_a, dof_b))
    method = torch.where(both & ~differ, 2, torch.where(torch.isnan(var_b) | differ, 0, 1))
    dof = torch.where(torch.isnan(var), torch.zeros_like(dof), dof)
    return var, dof, method


def _interval(mean: Tensor, var: Tensor, dof: Tensor, ci: float) -> Estimate:
    q = torch.from_numpy(stats.t.ppf(0.5 + ci / 2, dof.clamp(min=1).numpy())).to(torch.float64)
    q = torch.where(dof > 0, q, torch.full_like(q, float("nan")))
    se = var.sqrt()
    return Estimate(mean, se, mean - q * se, mean + q * se)


def _collapsed(exps: Tensor, est: Estimate) -> Estimate:
    """Apply the ``-inf`` rules of the module docstring to the exponents' estimate."""
    some, every = torch.isneginf(exps).any(0), torch.isneginf(exps).all(0)
    ninf = torch.full_like(est.mean, float("-inf"))
    top = exps.max(0).values
    return Estimate(
        torch.where(some, ninf, est.mean),
        torch.where(every, torch.zeros_like(est.stderr), torch.where(some, est.stderr * float("nan"), est.stderr)),
        torch.where(some, ninf, est.lower),
        torch.where(every, ninf, torch.where(some, top, est.upper)),
    )


def _replicates(exps, stats: BlockStats, length: int, n_boot: int, generator) -> list[Tensor]:
    """Bootstrap replicates ``(n_boot, k)`` of the mean spectrum: (a) over samples, (b) over pooled centred blocks."""
    out, b = [], exps.shape[0]
    mean = exps.mean(0)
    pools = []
    if b >= 2:
        pools.append((exps - mean, 1.0))
    if length > 0:
        blocks = _grouped_means(stats, length // stats.base)
        m = blocks.shape[1]
        pools.append(((blocks - blocks.mean(1, keepdim=True)).reshape(-1, exps.shape[1]), math.sqrt(m / (m - 1))))
    for resid, scale in pools:
        n = resid.shape[0]
        idx = torch.randint(n, (n_boot, n), generator=generator)
        counts = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones_like(idx, dtype=torch.float64)
        )
        out.append(mean + scale * (counts @ torch.nan_to_num(resid, neginf=0.0)) / n)
    return out


def _bootstrap(fn, point: Tensor, reps: list[Tensor], ci: float) -> Estimate:
    """The estimate of ``fn(spectrum)``: the bootstrap (of ``reps``) with the larger spread gives error and bounds."""
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    best = None
    for r in reps:
        vals = fn(r)
        se = vals.std()
        if best is None or se > best[0]:
            best = (se, torch.quantile(vals, torch.tensor([0.5 - ci / 2, 0.5 + ci / 2], dtype=torch.float64)))
    if best is None:
        return Estimate(fn(point), nan, nan, nan)
    return Estimate(fn(point), best[0], best[1][0], best[1][1])


def _entropy(spectrum: Tensor) -> Tensor:
    return spectrum.clamp(min=0).sum(-1)


def lyapunov_uncertainty(
    exponents: Tensor, local: Tensor | BlockStats, *, ci: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> Uncertainty:
    """Standard errors and confidence intervals of the mean Lyapunov spectrum, its dimension and entropy.

    Parameters
    ----------
    exponents : Tensor
        ``(B, k)``: the per-sample exponents (descending).
    local : Tensor or BlockStats
        ``(B, T, k)``: the local exponents in the same order (NaN where no counted QR happened), or their
        streamed summary (:class:`BlockStats`, e.g. from :class:`BlockAccumulator`).
    ci : float
        Confidence level of the intervals, in (0, 1).
    n_boot : int
        Bootstrap replicates for the Kaplan-Yorke dimension and the entropy.
    seed : int
        Seeds the bootstrap (a private generator: the global random state is untouched).

    Returns
    -------
    Uncertainty
        How the errors are combined: see the module docstring.

    Examples
    --------
    >>> import torch
    >>> local = -0.5 + 0.1 * torch.randn(4, 400, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> u = lyapunov_uncertainty(local.mean(1), local)
    >>> bool(((u.exponents.lower < -0.5) & (-0.5 < u.exponents.upper)).all()), u.block_length.tolist()
    (True, [20, 20])
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be a confidence level in (0, 1); got {ci!r}")
    shape = local.sums.shape if isinstance(local, BlockStats) else local.shape
    if exponents.dim() != 2 or len(shape) != 3 or shape[::2] != exponents.shape:
        raise ValueError(
            f"exponents must be (B, k) and local (B, T, k) with the same B and k; got {tuple(exponents.shape)} "
            f"and {tuple(shape)}"
        )
    exps = exponents.detach().to("cpu", torch.float64)
    stats = _as_blocks(local)
    b, k = exps.shape
    finite = torch.where(torch.isneginf(exps), torch.zeros_like(exps), exps)
    var_a = finite.var(0) / b if b >= 2 else torch.full((k,), float("nan"), dtype=torch.float64)
    dof_a = torch.full((k,), float(b - 1), dtype=torch.float64)
    lengths = choose_block_length(stats)
    var_b, dof_b = _time_variance(stats, lengths)
    var, dof, use_b = _combine(var_a, dof_a, var_b, dof_b)
    est = _collapsed(exps, _interval(exps.mean(0), var, dof, ci))
    gen = torch.Generator().manual_seed(seed)
    reps = _replicates(finite, stats, int(lengths.max()), n_boot, gen)
    dead = torch.isneginf(est.mean)
    reps = [torch.where(dead, est.mean, r) for r in reps]
    point = est.mean
    return Uncertainty(
        est,
        _bootstrap(kaplan_yorke, point, reps, ci),
        _bootstrap(_entropy, point, reps, ci),
        lengths,
        use_b,
        ci,
    )


def convergence(
    local: Tensor | BlockStats, exponents: Tensor | None = None, *, fraction: float = 0.5, threshold: float = 3.0
) -> Convergence:
    """Whether each exponent's running estimate has settled, and roughly how many more steps it needs.

    The running estimate after the counted steps up to t is the mean over samples of each sample's average of
    its local exponents so far. Its drift over the last ``fraction`` of the counted steps (from ``n' = (1 -
    fraction) n`` to ``n``) is compared with the standard error ``se`` of the final estimate
    (:func:`lyapunov_uncertainty` on the last ``fraction`` alone, scaled to the whole run, so that the transient
    itself does not inflate it): for a converged, uncorrelated sequence the drift has standard deviation
    ``se * sqrt(n / n' - 1)``, and the exponent counts as converged when ``|drift|`` is within ``threshold`` of
    that. Otherwise a transient bias ``C / n`` is fitted to the drift, and ``more_steps`` is what brings it below
    one standard error: ``n* = (C / (se sqrt(n)))^2`` counted steps in all, so ``n* - n`` more.

    Parameters
    ----------
    local : Tensor or BlockStats
        ``(B, T, k)`` local exponents (NaN where no counted QR happened), or their :class:`BlockStats` (the
        running estimate is then followed at block ends, and the last ``fraction`` starts at one).
    exponents : Tensor, optional
        ``(B, k)`` per-sample exponents (default: the step-weighted average of ``local``).
    fraction, threshold : float
        The part of the run whose drift is measured, and the tolerance in standard deviations.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> t = torch.arange(1, 2001, dtype=torch.float64)[None, :, None]
    >>> noise = 0.1 * torch.randn(4, 2000, 1, generator=g, dtype=torch.float64)
    >>> convergence(noise - 0.5).converged.tolist(), convergence(noise - 0.5 + 20 / t).converged.tolist()
    ([True], [False])
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1); got {fraction!r}")
    stats = _as_blocks(local)
    covered = torch.cumsum(stats.steps, 0)
    if exponents is None:
        exponents = stats.sums.sum(1) / covered[-1]
    running = (torch.cumsum(stats.sums, 1) / covered[:, None]).mean(0)
    n = float(covered[-1]) if covered.numel() else 0.0
    j = int(torch.searchsorted(covered, (1 - fraction) * n, right=True)) - 1
    if j < 0 or j + 1 >= covered.numel():
        nan = torch.full((stats.sums.shape[2],), float("nan"), dtype=torch.float64)
        return Convergence(torch.zeros_like(nan, dtype=torch.bool), nan, nan, torch.full_like(nan, n).long())
    n_start = float(covered[j])
    tail = stats.slice(j + 1)
    tail_mean = tail.sums.sum(1) / tail.steps.sum()
    se = lyapunov_uncertainty(tail_mean, tail, n_boot=2).exponents.stderr * math.sqrt(1 - n_start / n)
    drift = running[-1] - running[j]
    dead = torch.isneginf(exponents.detach().cpu()).all(0)
    ok = dead | (drift.abs() <= threshold * se * math.sqrt(n / n_start - 1))
    c = drift / (1 / n_start - 1 / n)
    needed = (c / (se * math.sqrt(n))) ** 2 - n
    needed = torch.where(torch.isfinite(needed), needed.clamp(min=n), torch.full_like(needed, n))
    more = torch.where(ok, torch.zeros_like(needed), needed.ceil())
    return Convergence(ok, torch.where(dead, torch.zeros_like(drift), drift), se, more.long())
