"""Lyapunov vectors as a labelled Dataset: :func:`lyapunov_vectors` (the numbers come from :mod:`rnnjac._clv`)."""

from __future__ import annotations

import os

import numpy as np
import torch
import xarray as xr

from ._checks import check_lyapunov_options, check_positive_int, prepare
from ._clv import DEFAULT_MAX_MEMORY, lyapunov_vector_tensors, participation_ratio, subspace_angle
from ._datasets import build_dataset

__all__ = ["lyapunov_vectors"]

DEFAULT_TIMES = 5


def _int(name: str, value, minimum: int = 0) -> int:
    check_positive_int(name, value, minimum=minimum)
    return int(value)


def _transients(steps: int, warmup: int, tangent_warmup, backward_transient, covariant: bool) -> tuple[int, int]:
    """``tangent_warmup`` and ``backward_transient``, a quarter of the ``T - warmup`` steps each when None."""
    quarter = max(0, steps - warmup) // 4
    tw = quarter if tangent_warmup is None else _int("tangent_warmup", tangent_warmup)
    if not covariant:
        return tw, 0
    bt = quarter if backward_transient is None else _int("backward_transient", backward_transient)
    counted = steps - warmup - tw
    if counted >= 1 and bt >= counted:
        raise ValueError(
            f"backward_transient must leave at least one step of the {counted} steps after warmup + "
            f"tangent_warmup = {warmup + tw} (T = {steps}); got backward_transient={bt}"
        )
    return tw, bt


def _times(times, first: int, last: int) -> list[int]:
    """The stored step numbers: ``times`` checked to lie in ``[first, last]``, or a few evenly spaced there."""
    if times is None:
        return sorted({int(round(t)) for t in np.linspace(first, last, min(DEFAULT_TIMES, last - first + 1))})
    values = np.atleast_1d(np.asarray(times))
    if values.ndim != 1 or values.size == 0 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"times must be a non-empty sequence of integer step numbers; got {times!r}")
    outside = [int(t) for t in values if not first <= t <= last]
    if outside:
        raise ValueError(
            f"times must lie in [{first}, {last}] (from warmup + tangent_warmup to T - backward_transient); "
            f"got {outside[:5]}{' ...' if len(outside) > 5 else ''}"
        )
    return sorted({int(t) for t in values})


def _check_split(split, k: int) -> None:
    if split is not None and (isinstance(split, bool) or not isinstance(split, (int, np.integer)) or not 0 < split < k):
        raise ValueError(f"split must be None or an integer with 1 <= split <= k - 1 = {k - 1}; got {split!r}")


def lyapunov_vectors(
    model,
    inputs,
    h0=None,
    *,
    k: int | None = None,
    times=None,
    covariant: bool = True,
    warmup: int = 0,
    tangent_warmup: int | None = None,
    backward_transient: int | None = None,
    split: int | None = None,
    state: str = "full",
    method: str = "auto",
    batch_first: bool | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    submodule=None,
    spill_dir=None,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> xr.Dataset:
    """Backward (Gram-Schmidt) and covariant Lyapunov vectors of the top ``k`` exponents, at chosen times.

    The backward vectors are the columns of ``Q_t`` in the QR chain ``Q_t R_t = J_t Q_{t-1}`` of
    :func:`rnnjac.lyapunov_spectrum` (Benettin et al. 1980): orthonormal, and ``q_1 .. q_i`` span the directions
    that grew fastest in the past. The covariant vectors (``covariant=True``) follow the dynamics,
    ``J_t v_i(t-1) = g_{t,i} v_i(t)`` with ``g_{t,i} > 0``, and ``log g_{t,i}`` averages to ``lambda_i``; they are
    computed by Ginelli's method (Ginelli et al., PRL 99, 130601, 2007; Ginelli, Chaté, Livi & Politi,
    J. Phys. A 46, 254005, 2013): a forward pass stores every ``R_t``, then a backward pass
    ``C_{t-1} = R_t^{-1} C_t`` (columns normalised) from a random upper-triangular ``C_T`` gives
    ``v_i(t) = Q_t c_i(t)``. Vectors have unit norm and an arbitrary sign. Exponents are in nats per step
    (the README's "Conventions" section).

    Three transients, in steps: ``warmup`` (the state alone), ``tangent_warmup`` (the forward QR chain settles,
    so the backward vectors converge) and ``backward_transient`` (the last steps, where the backward pass has not
    yet forgotten its random start, are not reported). Vectors are reported at step numbers ``times`` in
    ``[warmup + tangent_warmup, T - backward_transient]``.

    Cost: the forward pass costs what :func:`rnnjac.lyapunov_spectrum` does with the same ``k``; the backward
    pass adds one ``k x k`` triangular solve per step and sample, ``O(B T k^3)`` (small next to the forward pass's
    ``O(B T D^2 k)`` unless ``k`` is close to ``D``). Memory: the R factors take ``B (T - warmup - tangent_warmup)
    k^2`` numbers (8 bytes each in float64: ``B = 8, T = 10^5, k = 64`` is 26 GB); beyond ``max_memory`` bytes they
    are written to a temporary ``.npy`` file under ``spill_dir`` in chunks of at most ``max_memory`` bytes and read
    back once in reverse (the file is removed afterwards; the disk traffic is those bytes twice). The stored vectors
    take ``2 B len(times) D k`` numbers.

    Parameters
    ----------
    model, inputs, h0, state, method, batch_first, generator, dtype, device, submodule
        As in :func:`rnnjac.spectra` (``generator`` draws the initial basis, as there, then the initial ``C_T``).
    k : int, optional
        Number of vectors, ``1 <= k <= D`` (default D).
    times : sequence of int, optional
        Step numbers t (``s_t`` after step t) at which to store the vectors; default: 5 evenly spaced in the
        allowed range.
    covariant : bool
        Also the covariant vectors, their exponents and the unstable-stable angle (else backward vectors only,
        no R factors kept).
    warmup, tangent_warmup, backward_transient : int, optional
        The transients above; ``tangent_warmup`` and ``backward_transient`` default to a quarter of the
        ``T - warmup`` steps each, so that the vectors are reported over the middle half.
    split : int, optional
        The first ``split`` covariant vectors span the unstable subspace, the others the stable one (default:
        per sample, the vectors with a positive ``covariant_exponents``).
    spill_dir : str or path, optional
        Where the R factors go when they exceed ``max_memory`` (default: the system's temporary directory).
    max_memory : int
        Bytes of R factors kept in memory (default 1 GiB; 0 always spills).

    Returns
    -------
    xarray.Dataset
        ``backward_lyapunov_vectors`` and ``covariant_lyapunov_vectors`` on dims ``batch``, ``time`` (the stored
        steps), ``unit`` (coords ``layer``, ``part``, ``neuron`` as for the states), ``le_index``;
        ``participation_ratio`` ``(sum v^2)^2 / sum v^4`` of each vector (covariant when computed, else backward:
        how many units take part); ``lyapunov_exponents`` (mean ``log R_ii`` after the tangent transient, in vector
        order); with ``covariant``: ``covariant_exponents`` (mean ``log ||J_t v_i(t-1)||`` over
        ``warmup + tangent_warmup < t <= T - backward_transient``), ``unstable_dimension`` and
        ``unstable_stable_angle``, the smallest angle between the two subspaces (near 0: a near-tangency; only the
        top ``k`` vectors span the stable side). The transients are in the attrs.

    Examples
    --------
    >>> import torch, rnnjac
    >>> rnn = torch.nn.RNN(1, 8, batch_first=True)
    >>> ds = rnnjac.lyapunov_vectors(rnn, torch.randn(2, 200, 1), k=3, times=[80, 120],
    ...                              generator=torch.Generator().manual_seed(0))
    >>> ds.covariant_lyapunov_vectors.dims, ds.covariant_lyapunov_vectors.shape
    (('batch', 'time', 'unit', 'le_index'), (2, 2, 8, 3))
    >>> ds.attrs["tangent_warmup"], ds.attrs["backward_transient"]
    (50, 50)
    """
    problem = prepare(
        model, inputs, h0, state=state, method=method, batch_first=batch_first, dtype=dtype, device=device,
        submodule=submodule,
    )  # fmt: skip
    d, steps = problem.dyn.size(problem.state), problem.steps
    check_positive_int("warmup", warmup, minimum=0)
    tw, bt = _transients(steps, int(warmup), tangent_warmup, backward_transient, bool(covariant))
    check_lyapunov_options(problem, k, warmup, tw, 1)
    k = d if k is None else int(k)
    _check_split(split, k)
    check_positive_int("max_memory", max_memory, minimum=0)
    if spill_dir is not None and not os.path.isdir(spill_dir):
        raise ValueError(f"spill_dir must be an existing directory; got {spill_dir!r}")
    stored = _times(times, warmup + tw, steps - bt)
    out = lyapunov_vector_tensors(
        problem, k, stored, covariant=bool(covariant), warmup=warmup, tangent_warmup=tw, backward_transient=bt,
        generator=generator, max_memory=int(max_memory), spill_dir=spill_dir,
    )  # fmt: skip
    return _dataset(problem, out, stored, split, dict(warmup=warmup, tangent_warmup=tw, backward_transient=bt), k)


def _dataset(problem, out, stored: list[int], split, transients: dict, k: int) -> xr.Dataset:
    """Label the tensors of :func:`rnnjac._clv.lyapunov_vector_tensors`."""
    variables = {
        "backward_lyapunov_vectors": out.backward,
        "lyapunov_exponents": out.exponents,
    }
    shown = out.backward
    if out.covariant is not None:
        shown = out.covariant
        b, n, d, _ = out.covariant.shape
        m = (out.covariant_exponents > 0).sum(-1) if split is None else torch.full((b,), int(split))
        m = m.to(device=out.covariant.device)
        angle = subspace_angle(out.covariant.reshape(b * n, d, k), m.repeat_interleave(n))
        variables.update(
            covariant_lyapunov_vectors=out.covariant,
            covariant_exponents=out.covariant_exponents,
            unstable_dimension=m,
            unstable_stable_angle=angle.reshape(b, n),
        )
    variables["participation_ratio"] = participation_ratio(shown, dim=-2)
    attrs = {
        **transients,
        "k": k,
        "covariant": out.covariant is not None,
        "split": -1 if split is None else int(split),
        "participation_ratio_of": "covariant" if out.covariant is not None else "backward",
        "r_factors_spilled": out.spilled,
        "lyapunov_units": "nats/step",
        **problem.attrs,
    }
    return build_dataset(
        variables,
        dyn=problem.dyn,
        state=problem.state,
        method=problem.method,
        dtype=problem.xs.dtype,
        device=problem.xs.device,
        time=np.asarray(stored),
        config={**transients, "k": k, "times": stored, "split": split, "batch": problem.batch, "steps": problem.steps},
        attrs=attrs,
    )
