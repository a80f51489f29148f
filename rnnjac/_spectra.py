r"""Spectra of the step Jacobians: singular values, eigenvalues, Lyapunov exponents, end-to-end.

Lyapunov exponents (Benettin et al. 1980; Shimada & Nagashima 1979), in nats per step:

    Q_0 random orthonormal (D, k);   Q_t R_t = qr(J_t Q_{t-1}),  diag(R_t) > 0
    lambda_i = (1 / n) sum_{counted t} log R_t[i, i]

with tangents propagated as ``Q <- J_t Q`` (never ``J^T Q``), ``warmup`` steps of the state alone
first, then ``tangent_warmup`` steps of tangent evolution that are not counted, then ``n`` counted
steps. With ``reortho_every = m`` the QR happens every m steps (and at the end of each phase); the
growth over the m steps is then counted at once (the same diagonal as m every-step QRs, up to rounding:
see :mod:`rnnjac._lyapunov_qr`). ``reortho_every="auto"`` picks m online from the tangent block's condition
number, and ``warmup``/``tangent_warmup="auto"`` pick the transients from the run (MSER, White 1997).
``local_lyapunov`` stores ``log R_ii / m`` at each QR step (NaN elsewhere). Only ``diag(R)`` is kept.

Singular dynamics (the same rule in float32 and float64, :func:`rnnjac._linalg.collapse_floor`): an
exponent is ``-inf`` when its growth ``R_ii`` was at or below the floor ``||J_t Q||_F (2**-22 sqrt(D))**m``
(a QR block of m steps) at *every* counted QR. Below that floor float32 cannot tell a growth from an
exact collapse (a saturated tanh or sigmoid unit's derivative is exactly 0 in float32 once ``|a| > 9``,
in float64 only once ``|a| > 19``), so the count of ``-inf`` is the same in both dtypes: ``W_hh = 0``
gives D of them, a linear system with one zero eigenvalue one. A direction that collapses only at some
steps keeps a finite exponent: a growth of exactly 0 at such a step counts as the floor, any other
growth as its own log (so regular results are unchanged). ``kaplan_yorke_dimension`` uses the finite
exponents (a ``-inf`` next exponent adds nothing) and ``ks_entropy`` sums the positive ones.

End-to-end singular values are those of ``ds_t/ds_0 = J_t ... J_1`` for every t, kept in the
overflow-free form of :class:`rnnjac._linalg.EndToEnd` and stored as natural logs only
(``end_to_end_log_singular_values``, in nats) because the values themselves leave the float64 range
after a few hundred steps of a chaotic model: ``numpy.exp`` of the variable gives the linear values,
which underflow to 0 below about 1e-308 (-709 nats) and overflow above 1e308. A direction that a step
maps exactly to zero (zero rows of ``J_t``: dead ReLU units, saturated units whose derivative is exactly
0 in the working dtype, zero weights) reads ``-inf`` from that step on; the others stay finite.

Time is processed in chunks: one batched linearisation per chunk, then the sequential tangent
updates use the factored ``J Q`` (one shared GEMM per weight matrix).
Memory is O(B T D) for per-step spectra and constant in T for exponents alone. ``progress=True``
advances a bar after every step of the sequential loop (or every chunk when there is none).

The numbers come from the tensor kernels of :mod:`rnnjac._kernels` (:func:`~rnnjac._kernels.spectra_tensors`);
this module checks the arguments, draws the progress bar and labels the result. The analysis options travel as
one :class:`rnnjac._options.SpectraOptions`, stored whole in the ``options_json`` attribute.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import fields, replace

import torch
import xarray as xr
from tqdm.auto import tqdm

from ._checks import check_generator, prepare
from ._datasets import build_dataset
from ._kernels import spectra_tensors
from ._options import SpectraOptions
from .errors import ConvergenceWarning

__all__ = ["spectra", "lyapunov_spectrum"]


def progress_bar(total: int, enabled: bool) -> tqdm:
    """The tqdm bar on stderr behind ``progress=True``; its ``update`` is the kernels' ``on_steps(n)`` callback."""
    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="step", desc="spectra", leave=False)


_CONFIG_KEYS = (
    "singular_values",
    "eigenvalues",
    "lyapunov",
    "k",
    "warmup",
    "tangent_warmup",
    "reortho_every",
    "end_to_end",
    "keep_states",
    "local_lyapunov",
    "ci",
)
_DEFAULTS = {f.name: f.default for f in fields(SpectraOptions)}


def _unchanged(value, default) -> bool:
    return value is default or (type(value) is type(default) and value == default)


def _resolve_options(options, generator, keywords: dict) -> tuple[SpectraOptions, torch.Generator | None]:
    """The :class:`SpectraOptions` of a call and the generator of its tangent basis.

    Without ``options`` they are built from the analysis ``keywords`` (``seed``: the generator's initial seed, or
    None for torch's global random state). With ``options``, every keyword must keep its default (else
    ``TypeError``); a ``generator`` given as well replaces ``options.seed``.
    """
    check_generator(generator)
    if options is None:
        seed = None if generator is None else int(generator.initial_seed())
        return SpectraOptions(**keywords, seed=seed), generator
    if not isinstance(options, SpectraOptions):
        raise TypeError(f"options must be a SpectraOptions (or None); got {type(options).__name__}")
    changed = [f"{name}={value!r}" for name, value in keywords.items() if not _unchanged(value, _DEFAULTS[name])]
    if changed:
        raise TypeError(
            f"pass the analysis either as options= or as keywords, not both; got options= and {', '.join(changed)}"
        )
    if generator is not None:
        return replace(options, seed=int(generator.initial_seed())), generator
    return options, options.generator()


UNCERTAINTY_METHOD = (
    "exponents: mean over the batch, standard error from the spread over trajectories and batch means over time "
    "blocks (pooled unless they differ), Student-t interval; Kaplan-Yorke dimension and entropy: seeded bootstrap"
)


#: beyond this many more steps the convergence warning calls the drift a slow transient rather than a step count
_MANY_STEPS = 10**6


def _uncertainty_attrs(values: dict, options: SpectraOptions) -> dict:
    """The ``ci``/``bootstrap_seed``/``uncertainty_method`` attrs, and the convergence warning (once per call)."""
    if "lyapunov_converged" not in values:
        return {}
    converged, more = values["lyapunov_converged"].bool(), values["lyapunov_more_steps"]
    if not bool(converged.all()):
        bad = torch.nonzero(~converged).flatten().tolist()
        names = ", ".join(f"lambda_{i + 1}" for i in bad[:8]) + (" ..." if len(bad) > 8 else "")
        need = int(more.max())
        how = (
            f"about {need} more counted steps are likely needed (longer inputs, or a longer warmup= or "
            "tangent_warmup=; per exponent: the variables lyapunov_converged and lyapunov_more_steps)"
            if need <= _MANY_STEPS
            else f"fitting the drift as a transient asks for {need:.1e} more counted steps: a slow transient (e.g. "
            "an approach to a fixed point), not noise; a longer warmup= or tangent_warmup='auto' removes it "
            "(per exponent: the variables lyapunov_converged and lyapunov_more_steps)"
        )
        warnings.warn(
            f"{len(bad)} of {converged.numel()} Lyapunov exponents have not converged ({names}): their running "
            f"estimate still drifts by more than 3 standard errors over the last half of the run; {how}",
            ConvergenceWarning,
            stacklevel=4,
        )
    return {
        "ci": options.ci,
        "bootstrap_seed": 0 if options.seed is None else options.seed,
        "uncertainty_method": UNCERTAINTY_METHOD,
    }


def _dataset_attrs(values: dict, options: SpectraOptions, problem, generator) -> dict:
    """The global attributes of a spectra Dataset; pops ``values["attrs"]``, what the pass chose or measured
    (the steps used for ``"auto"`` transients, the QR intervals, the condition estimates), which go last."""
    run_attrs = values.pop("attrs", None) or {}
    return {
        "warmup": options.warmup,
        "tangent_warmup": options.tangent_warmup,
        "reortho_every": options.reortho_every,
        "seed": int(generator.initial_seed()) if generator is not None else -1,
        "k": options.k or problem.dyn.size(problem.state),
        "lyapunov_units": "nats/step",
        "options_json": options.to_json(),
        **problem.attrs,
        **_uncertainty_attrs(values, options),
        **run_attrs,
    }


def spectra(
    model,
    inputs,
    h0=None,
    *,
    options: SpectraOptions | None = None,
    state: str = "full",
    singular_values: bool | int = True,
    eigenvalues: bool = False,
    lyapunov: bool = True,
    k: int | None = None,
    warmup: int | str = 0,
    tangent_warmup: int | str = 0,
    reortho_every: int | str = 1,
    end_to_end: bool = False,
    keep_states: bool = False,
    local_lyapunov: bool = False,
    method: str = "auto",
    batch_first: bool | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    progress: bool = False,
    time_chunk: int | None = None,
    ci: float | None = 0.95,
    attrs: dict | None = None,
    submodule=None,
) -> xr.Dataset:
    """Spectra of the step Jacobians of a batch of trajectories, as a labelled Dataset.

    Parameters
    ----------
    model, inputs, h0, state, method, batch_first
        As in :func:`rnnjac.jacobians`.
    options : SpectraOptions, optional
        The whole analysis as one value (:class:`rnnjac.SpectraOptions`), instead of the keywords below:
        then ``state`` ... ``time_chunk`` must keep their defaults, and ``options.seed`` seeds the tangent
        basis unless ``generator`` is given.
    singular_values : bool or int
        Per-step singular values of ``J_t`` (descending): all, or the top ``k`` with an int ``1 <= k <= D``
        (for large models: computed without forming the full SVD).
    eigenvalues : bool
        Per-step eigenvalues (by modulus, descending) and the spectral radius.
    lyapunov : bool
        Lyapunov exponents (top ``k``, default all D), plus Kaplan-Yorke dimension and entropy.
    k : int, optional
        Number of exponents, ``1 <= k <= D``.
    warmup, tangent_warmup : int or "auto"
        Transients: ``warmup`` steps of the state alone, then ``tangent_warmup`` steps of tangent evolution not
        counted. ``"auto"`` chooses each from the run by the MSER rule (White 1997): the state transient from a
        per-step state statistic, the tangent transient from the block means of ``log R_ii`` (at most half of
        the counted run is dropped); the steps chosen are the attrs ``warmup_used``/``tangent_warmup_used``.
    reortho_every : int or "auto"
        Steps between QR re-orthonormalisations. With more than 1 the tangent block's condition number is
        tracked (attr ``lyapunov_max_log10_condition``) and a :class:`rnnjac.errors.ConditioningWarning` names
        the exponents at risk when it exceeds ``1/sqrt(eps)``. ``"auto"``: a QR only when the block's predicted
        condition number reaches 1e6 (float64; 1e3 in float32), at most every 64 steps, so that the exponents
        equal those of a QR every step (to 1e-6 in float64); attrs ``reortho_interval_min``/``_mean``/``_max``
        and ``lyapunov_qr_count`` record what was used. See the README's "Conventions" section.
    end_to_end : bool
        Singular values of ``ds_t/ds_0`` for every t (as logs, stably; see module docstring).
    keep_states : bool
        Store the states ``s_1..s_T``.
    local_lyapunov : bool
        Store the per-step ``log R_ii``.
    ci : float or None
        With ``lyapunov``: confidence level of the intervals of the batch-mean exponents, Kaplan-Yorke dimension
        and entropy (``*_mean``, ``*_stderr``, ``*_bounds`` on dim ``bound``), and the convergence diagnostics
        ``lyapunov_converged``/``lyapunov_more_steps``; a :class:`rnnjac.ConvergenceWarning` names the exponents
        that have not settled. Errors combine the spread over trajectories with batch means over time blocks
        (memory independent of T); see the README's "Conventions" section. None: none of these.
    generator : torch.Generator, optional
        Seeds the initial tangent basis.
    dtype, device : optional
        Run on a converted copy of the model (e.g. ``torch.float64``); the model is untouched.
    progress : bool
        A tqdm bar on stderr.
    time_chunk : int, optional
        Steps linearised at once (default: bounded by ~64 MB of Jacobians).
    attrs : dict, optional
        Extra global attributes (e.g. the checkpoint path).
    submodule : str or nn.Module, optional
        The recurrent core of a larger model. When ``model`` is any ``nn.Module`` other than an
        ``nn.RNN``/``GRU``/``LSTM`` or cell (or ``submodule`` is given), the *whole* model runs once on
        ``inputs`` (in ``eval()`` mode, without gradients) and a forward pre-hook records what the recurrent
        submodule receives: its input sequence and initial state, in its own layout. That submodule is then
        analysed on exactly those inputs (``h0``, when given, replaces the captured state; ``batch_first``
        must stay None). ``submodule`` names it (``"core.gru"``) or is the module object; by default the model's
        only recurrent submodule is used (and logged), and several are an error that lists them. The result
        records the dotted name in ``attrs["submodule"]``. The same keyword, with the same meaning, is on
        :func:`~rnnjac.trajectory`, :func:`~rnnjac.jacobians`, :func:`~rnnjac.iter_jacobians`,
        :func:`~rnnjac.lyapunov_spectrum`, :func:`~rnnjac.verify`, :func:`~rnnjac.finite_difference_jacobians`,
        :func:`~rnnjac.fixed_points` and the penalties of :mod:`rnnjac.regularizers`.

    Returns
    -------
    xarray.Dataset
        The variables computed, on dims ``batch``, ``time`` (1..T), ``sv_index``, ``eig_index``,
        ``le_index``, ``unit``; the options in the ``options_json`` attribute.

    Examples
    --------
    >>> import torch, rnnjac
    >>> gru = torch.nn.GRU(3, 8, batch_first=True)
    >>> ds = rnnjac.spectra(gru, torch.randn(4, 50, 3), k=3, eigenvalues=True,
    ...                     generator=torch.Generator().manual_seed(0))
    >>> ds.lyapunov_exponents.shape, ds.singular_values.dims
    ((4, 3), ('batch', 'time', 'sv_index'))
    >>> ds = rnnjac.spectra(gru, torch.randn(4, 50, 3), options=rnnjac.SpectraOptions(k=3, seed=0))
    >>> rnnjac.SpectraOptions.from_json(ds.attrs["options_json"]).k
    3

    The recurrent core of a larger model, on what the model feeds it:

    >>> model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.GRU(3, 8, batch_first=True))
    >>> ds = rnnjac.spectra(model, torch.randn(4, 50, 5), k=3)  # the same as spectra(model[1], model[0](x), k=3)
    >>> ds.attrs["submodule"]
    '1'
    """
    keywords = dict(
        state=state,
        singular_values=singular_values,
        eigenvalues=eigenvalues,
        lyapunov=lyapunov,
        k=k,
        warmup=warmup,
        tangent_warmup=tangent_warmup,
        reortho_every=reortho_every,
        end_to_end=end_to_end,
        keep_states=keep_states,
        local_lyapunov=local_lyapunov,
        method=method,
        dtype=dtype,
        device=device,
        time_chunk=time_chunk,
        ci=ci,
    )
    options, generator = _resolve_options(options, generator, keywords)
    problem = prepare(
        model,
        inputs,
        h0,
        state=options.state,
        method=options.method,
        batch_first=batch_first,
        dtype=options.torch_dtype,
        device=options.device,
        submodule=submodule,
    )
    options.check(problem)
    with progress_bar(problem.steps, progress) as bar:
        values = spectra_tensors(problem, options, generator=generator, on_steps=bar.update if progress else None)
    config = {name: getattr(options, name) for name in _CONFIG_KEYS}
    config.update(batch=problem.batch, steps=problem.steps)
    extra = _dataset_attrs(values, options, problem, generator)
    extra.update(attrs or {})
    return build_dataset(
        values,
        dyn=problem.dyn,
        state=problem.state,
        method=problem.method,
        dtype=problem.xs.dtype,
        device=problem.xs.device,
        config=config,
        attrs=extra,
    )


def lyapunov_spectrum(
    model,
    inputs,
    h0=None,
    *,
    options: SpectraOptions | None = None,
    k: int | None = None,
    warmup: int | str = 0,
    tangent_warmup: int | str = 0,
    reortho_every: int | str = 1,
    local_lyapunov: bool = False,
    state: str = "full",
    method: str = "auto",
    batch_first: bool | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    progress: bool = False,
    ci: float | None = 0.95,
    attrs: dict | None = None,
    submodule=None,
) -> xr.Dataset:
    """Lyapunov exponents alone (memory constant in T), with Kaplan-Yorke dimension and entropy.

    Same options as :func:`spectra` (``ci``: the intervals and convergence diagnostics, on by default;
    ``submodule``: the recurrent core of a larger model, see there); with
    ``options=`` its outputs are set to the exponents alone (``local_lyapunov`` as given). ``ks_entropy`` is
    the sum of the positive exponents (Pesin's bound on the Kolmogorov-Sinai entropy), ``kaplan_yorke_dimension``
    the Lyapunov dimension.

    Examples
    --------
    >>> import torch, rnnjac
    >>> rnn = torch.nn.RNN(1, 16, batch_first=True)
    >>> ds = rnnjac.lyapunov_spectrum(rnn, torch.zeros(2, 200, 1), k=4, warmup=50)
    >>> ds.lyapunov_exponents.attrs["units"]
    'nats/step'

    Fewer QRs for the same exponents, and the tangent transient chosen from the run:

    >>> ds = rnnjac.lyapunov_spectrum(rnn, torch.zeros(2, 200, 1), k=4, reortho_every="auto", tangent_warmup="auto")
    >>> ds.attrs["reortho_every"], ds.attrs["lyapunov_qr_count"] < 100, ds.attrs["tangent_warmup_used"] < 100
    ('auto', True, True)
    """
    keywords = dict(
        k=k,
        warmup=warmup,
        tangent_warmup=tangent_warmup,
        reortho_every=reortho_every,
        local_lyapunov=local_lyapunov,
        state=state,
        method=method,
        dtype=dtype,
        device=device,
        ci=ci,
    )
    if options is not None:
        options, generator = _resolve_options(options, generator, keywords)
        alone = dict(singular_values=False, eigenvalues=False, end_to_end=False, keep_states=False, lyapunov=True)
        options = replace(options, **alone)
        keywords = {}
    else:
        keywords.update(singular_values=False, lyapunov=True)
    return spectra(
        model,
        inputs,
        h0,
        options=options,
        batch_first=batch_first,
        generator=generator,
        progress=progress,
        attrs=attrs,
        submodule=submodule,
        **keywords,
    )
