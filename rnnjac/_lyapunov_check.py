r"""An independent check of the largest Lyapunov exponent by direct simulation (no Jacobian involved).

Each trajectory is evolved together with a perturbed copy, both by the model's own forward: for ``nn.RNN``,
``nn.GRU`` and ``nn.LSTM`` a float64 copy of the torch module, one step at a time (so the check does not share
rnnjac's re-implementation of the gates either); for cells and :class:`~rnnjac.CustomCell` the step of the
model. After ``warmup`` steps of the state alone the copy starts at ``s + eps u`` (``u`` a random unit vector
from ``generator``, ``eps = delta * max(||s||, 1)``); every ``renorm_every`` steps (and at the last step) the
separation ``d = s' - s`` is measured, ``log(||d|| / eps)`` is accumulated, and the copy is put back at
``s + eps_new d / ||d||``. The first ``tangent_warmup`` steps align the separation with the most unstable direction
and are not counted. ``lambda_1`` (nats per step) is the accumulated log growth over the counted steps.

The same inputs then go through the QR method (:func:`rnnjac.lyapunov_spectrum` with ``k=1``), and both estimates
get their standard errors from :func:`rnnjac._uncertainty.lyapunov_uncertainty` (the renormalisation intervals
play the role of the QR steps). The check passes when the difference lies inside its ``ci`` interval, with the
errors combined as ``sqrt(se_dns^2 + se_qr^2)`` (conservative: both runs share the trajectories, so their errors
are positively correlated) and the normal quantile.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
from scipy import stats
from torch import Tensor

from ._checks import prepare
from ._spectra import lyapunov_spectrum
from ._uncertainty import lyapunov_uncertainty
from .errors import RnnjacWarning

__all__ = ["verify_lyapunov", "LyapunovCheck", "check_options"]


@dataclass(frozen=True)
class LyapunovCheck:
    """What :func:`verify_lyapunov` returns; ``passed`` says whether the two estimates of lambda_1 agree."""

    dns: float
    """lambda_1 by direct simulation (mean over samples, nats/step)."""
    dns_stderr: float
    qr: float
    """lambda_1 by the QR method (mean over samples, nats/step)."""
    qr_stderr: float
    difference: float
    """``dns - qr``."""
    combined_stderr: float
    limit: float
    """``|difference|`` allowed: the normal quantile of ``ci`` times ``combined_stderr``."""
    passed: bool
    dns_per_sample: Tensor
    """``(B,)`` float64."""
    qr_per_sample: Tensor
    """``(B,)`` float64."""
    ci: float

    def attrs(self) -> dict:
        """Flat attributes (numbers) for a Dataset: ``lyapunov_check_*``, ``passed`` as 0/1."""
        keys = ("dns", "dns_stderr", "qr", "qr_stderr", "difference", "combined_stderr", "limit", "ci")
        out = {f"lyapunov_check_{k}": float(getattr(self, k)) for k in keys}
        out["lyapunov_check_passed"] = int(self.passed)
        return out


def _module_step(module: torch.nn.RNNBase, dyn):
    """``step(s, x)`` on the flat state through the torch module's own forward, one step at a time."""
    layers = dyn.num_layers

    def step(s: Tensor, x: Tensor) -> Tensor:
        parts = dyn.split(s)
        h = torch.stack([p[0] for p in parts])
        hx = (h, torch.stack([p[1] for p in parts])) if parts[0][1] is not None else h
        xin = x.unsqueeze(1) if module.batch_first else x.unsqueeze(0)
        _, out = module(xin, hx)
        if isinstance(out, tuple):
            return dyn.join([(out[0][i], out[1][i]) for i in range(layers)])
        return dyn.join([(out[i], None) for i in range(layers)])

    return step


def _forward(problem, original):
    """The step used by the simulation (module docstring) and a label for it."""
    module = getattr(original, "module", None)
    if isinstance(module, torch.nn.RNNBase) and not module.bidirectional:
        module = copy.deepcopy(module).to(dtype=problem.xs.dtype, device=problem.xs.device).eval()
        return _module_step(module, problem.dyn), "torch module forward"
    return problem.dyn.step, "model step"


@torch.no_grad()
def simulate(
    step, s0: Tensor, xs: Tensor, *, renorm_every: int, delta: float, warmup: int, tangent_warmup: int, generator=None
) -> tuple[Tensor, Tensor]:
    """Per-sample lambda_1 ``(B,)`` and the local values ``(B, T, 1)`` (log growth per step of each
    renormalisation interval, at its last step; NaN elsewhere), by the scheme of the module docstring."""
    b, steps = xs.shape[:2]
    local = torch.full((b, steps, 1), float("nan"), dtype=torch.float64)
    s = s0
    for t in range(warmup):
        s = step(s, xs[:, t])
    u = torch.randn(s.shape, generator=generator, dtype=torch.float64).to(s)
    eps = delta * torch.linalg.vector_norm(s, dim=-1).clamp(min=1.0)
    p = s + eps[:, None] * u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)
    start, total, since = warmup + tangent_warmup, torch.zeros(b, dtype=torch.float64), 0
    for t in range(warmup, steps):
        s, p = step(s, xs[:, t]), step(p, xs[:, t])
        since += 1
        if since < renorm_every and t + 1 != steps and t + 1 != start:
            continue
        d = p - s
        norm = torch.linalg.vector_norm(d, dim=-1)
        growth = torch.log(norm / eps).double().cpu()
        if t + 1 > start:
            total += growth
            local[:, t, 0] = growth / since
        eps = delta * torch.linalg.vector_norm(s, dim=-1).clamp(min=1.0)
        p = s + eps[:, None] * d / norm.clamp(min=torch.finfo(norm.dtype).tiny)[:, None]
        since = 0
    return total / (steps - start), local


def check_options(renorm_every, delta, warmup, tangent_warmup, ci, steps) -> None:
    """The options of :func:`verify_lyapunov` for ``steps`` steps: a ``ValueError`` naming the keyword, before any
    work."""
    for name, value, low in (
        ("renorm_every", renorm_every, 1),
        ("warmup", warmup, 0),
        ("tangent_warmup", tangent_warmup, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be a relative perturbation size in (0, 1); got {delta!r}")
    if not (isinstance(ci, float) and 0 < ci < 1):
        raise ValueError(f"ci must be a confidence level in (0, 1); got {ci!r}")
    if warmup + tangent_warmup + 2 * renorm_every > steps:
        raise ValueError(
            f"warmup + tangent_warmup + 2 * renorm_every must fit in the T = {steps} steps (two renormalisations "
            f"at least); got warmup={warmup}, tangent_warmup={tangent_warmup}, renorm_every={renorm_every}"
        )


def verify_lyapunov(
    model,
    inputs,
    h0=None,
    *,
    renorm_every: int = 10,
    delta: float = 1e-7,
    warmup: int = 0,
    tangent_warmup: int = 0,
    generator: torch.Generator | None = None,
    ci: float = 0.95,
    dtype: torch.dtype | None = None,
    device=None,
    batch_first: bool | None = None,
    submodule=None,
) -> LyapunovCheck:
    """Check the QR estimate of lambda_1 against a direct simulation of two nearby trajectories.

    Parameters
    ----------
    model, inputs, h0, batch_first, submodule
        As in :func:`rnnjac.lyapunov_spectrum` (the full state is perturbed).
    renorm_every : int
        Steps between renormalisations of the separation.
    delta : float
        Size of the separation relative to ``max(||s||, 1)``.
    warmup, tangent_warmup : int
        Steps of the state alone, then steps of separation (resp. tangent) evolution not counted; the same for
        both estimates.
    generator : torch.Generator, optional
        Seeds the QR's initial tangent and the initial separation.
    ci : float
        Confidence level of the comparison.
    dtype, device : optional
        The working precision and device: built-in modules run in float64 by default (a separation of
        ``1e-7`` needs it); a custom step runs as given (give it float64 tensors).

    Returns
    -------
    LyapunovCheck
        Both estimates, their standard errors, the difference and ``passed``; ``.attrs()`` for a Dataset.

    Examples
    --------
    >>> import torch, rnnjac
    >>> rnn = torch.nn.RNN(1, 32, batch_first=True)
    >>> check = rnnjac.verify_lyapunov(rnn, torch.randn(4, 200, 1), warmup=20, tangent_warmup=20,
    ...                                generator=torch.Generator().manual_seed(0))
    >>> check.passed
    True
    """
    plain = prepare(model, inputs, h0, batch_first=batch_first, submodule=submodule)
    check_options(renorm_every, delta, warmup, tangent_warmup, ci, plain.steps)
    if dtype is None and plain.dyn.convertible:
        dtype = torch.float64
    problem = prepare(model, inputs, h0, batch_first=batch_first, dtype=dtype, device=device, submodule=submodule)
    if problem.xs.dtype != torch.float64 and delta < 1e-4:
        warnings.warn(
            f"the step runs in {problem.xs.dtype}, whose rounding swamps a separation of delta={delta}: give the "
            "step float64 tensors (or pass dtype=torch.float64 for a built-in module)",
            RnnjacWarning,
            stacklevel=2,
        )
    step, _ = _forward(problem, plain.dyn)
    lam, local = simulate(
        step,
        problem.s0,
        problem.xs,
        renorm_every=renorm_every,
        delta=delta,
        warmup=warmup,
        tangent_warmup=tangent_warmup,
        generator=generator,
    )
    ds = lyapunov_spectrum(
        model,
        inputs,
        h0,
        k=1,
        warmup=warmup,
        tangent_warmup=tangent_warmup,
        local_lyapunov=True,
        batch_first=batch_first,
        generator=generator,
        dtype=dtype,
        device=device,
        submodule=submodule,
        ci=None,  # the errors are computed below from the local exponents
    )
    qr = torch.from_numpy(ds.lyapunov_exponents.values).to(torch.float64)
    a = lyapunov_uncertainty(lam[:, None], local, ci=ci, n_boot=2).exponents
    b = lyapunov_uncertainty(qr, torch.from_numpy(ds.local_lyapunov.values), ci=ci, n_boot=2).exponents
    return _compare(float(a.mean[0]), float(a.stderr[0]), float(b.mean[0]), float(b.stderr[0]), lam, qr[:, 0], ci)


def _compare(dns, dns_se, qr, qr_se, lam, qr_each, ci) -> LyapunovCheck:
    if math.isinf(dns) and math.isinf(qr) and dns < 0 and qr < 0:
        diff, combined, limit, passed = 0.0, 0.0, 0.0, True  # both collapsed exactly
    else:
        diff = dns - qr
        combined = math.sqrt(dns_se**2 + qr_se**2)
        limit = float(stats.norm.ppf(0.5 + ci / 2)) * combined
        passed = bool(abs(diff) <= limit)
    return LyapunovCheck(dns, dns_se, qr, qr_se, diff, combined, limit, passed, lam, qr_each, ci)
