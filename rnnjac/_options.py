"""The options of one spectra analysis as one frozen value: :class:`SpectraOptions`.

Built and validated here, once: the value checks (types, ranges, choices, "nothing to compute") run when the
object is made (:meth:`SpectraOptions.__post_init__`), the checks that need the model and the inputs
(``k <= D``, transients shorter than ``T``) in :meth:`SpectraOptions.check`, which the kernels' entry
(:func:`rnnjac._kernels.spectra_tensors`) calls. The object travels whole from the command line, the checkpoint
pipeline and the sweeps down to the kernels, and is stored whole in the output's ``options_json`` attribute
(:meth:`SpectraOptions.to_json` / :meth:`SpectraOptions.from_json`). Errors name the Python keywords.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from ._checks import (
    METHODS,
    STATES,
    check_bool,
    check_choice,
    check_int_or_auto,
    check_lyapunov_options,
    check_positive_int,
)

__all__ = ["SpectraOptions"]

_OUTPUTS = ("singular_values", "eigenvalues", "lyapunov", "end_to_end", "keep_states")
_FLAGS = ("eigenvalues", "lyapunov", "end_to_end", "keep_states", "local_lyapunov")
_AUTO = ("warmup", "tangent_warmup", "reortho_every")  # an int, or "auto"


def _dtype_name(dtype) -> str | None:
    """``None``, or the name (``"float64"``) of a floating-point torch dtype given as a dtype or its name."""
    if dtype is None:
        return None
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(
            f"dtype must be a floating-point torch dtype (torch.float32, torch.float64) or its name; got {dtype!r}"
        )
    return str(value).replace("torch.", "")


def _confidence_level(ci) -> float | None:
    """``None``, or ``ci`` as a float strictly between 0 and 1."""
    if ci is None:
        return None
    if isinstance(ci, bool) or not isinstance(ci, (int, float, np.integer, np.floating)) or not 0 < ci < 1:
        raise ValueError(f"ci must be a confidence level strictly between 0 and 1 (e.g. 0.95) or None; got {ci!r}")
    return float(ci)


def _device_name(device) -> str | None:
    """``None``, or the device as a string (``"cpu"``, ``"cuda:1"``); its availability is checked on use."""
    if device is None:
        return None
    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"device must be a torch.device or a name such as 'cpu', 'cuda', 'cuda:1'; got {device!r}"
        ) from None
    return str(device)


@dataclass(frozen=True)
class SpectraOptions:
    """Everything a spectra analysis computes and how: one frozen, validated value.

    The fields are the keywords of :func:`rnnjac.spectra` (see there), with ``seed`` in place of a generator and
    ``dtype``/``device`` stored by name. ``seed=None`` draws the initial tangent basis from torch's global random
    state (what ``spectra(generator=None)`` does); the default ``0`` is reproducible.

    Parameters
    ----------
    singular_values : bool or int
        Per-step singular values: all (True), none (False) or the top ``k`` (an int, ``1 <= k <= D``).
    eigenvalues, lyapunov, end_to_end, keep_states, local_lyapunov : bool
        What to compute (at least one output; ``local_lyapunov`` needs ``lyapunov``).
    k : int, optional
        Number of Lyapunov exponents (default all D); ``1 <= k <= D``.
    warmup, tangent_warmup : int or "auto"
        Transients (state only; tangents not counted), ``>= 0``; ``"auto"``: chosen from the run (the MSER
        rule), the choice recorded in the Dataset's attrs.
    reortho_every : int or "auto"
        Steps between QR re-orthonormalisations, ``>= 1``; ``"auto"``: as few as keep the exponents equal to
        those of a QR every step (the intervals used are recorded in the attrs).
    state : {"full", "h"}
    method : {"auto", "analytic", "autograd"}
    seed : int or None
        Seeds the initial tangent basis.
    dtype : str or torch.dtype, optional
        Analyse a converted copy of the model (``"float64"``); stored as its name.
    device : str or torch.device, optional
        Analyse on this device; stored as its name.
    time_chunk : int, optional
        Steps linearised at once (default: bounded memory).
    ci : float or None
        Confidence level of the exponents' intervals, in (0, 1) (default 0.95); None: no uncertainty or
        convergence variables (with ``lyapunov``).

    Examples
    --------
    >>> import torch
    >>> from rnnjac._options import SpectraOptions
    >>> opts = SpectraOptions(k=3, warmup=10, dtype=torch.float64)
    >>> opts.dtype, SpectraOptions.from_json(opts.to_json()) == opts
    ('float64', True)
    >>> SpectraOptions(reortho_every=0)
    Traceback (most recent call last):
    ...
    ValueError: reortho_every must be an integer >= 1; got 0
    """

    singular_values: bool | int = True
    eigenvalues: bool = False
    lyapunov: bool = True
    k: int | None = None
    warmup: int | str = 0
    tangent_warmup: int | str = 0
    reortho_every: int | str = 1
    end_to_end: bool = False
    keep_states: bool = False
    local_lyapunov: bool = False
    state: str = "full"
    method: str = "auto"
    seed: int | None = 0
    dtype: str | None = None
    device: str | None = None
    time_chunk: int | None = None
    ci: float | None = 0.95

    def __post_init__(self) -> None:
        for name in _FLAGS:
            check_bool(name, getattr(self, name))
        if not any(getattr(self, name) for name in _OUTPUTS):
            raise ValueError("nothing to compute: every output (singular_values, eigenvalues, lyapunov, ...) is off")
        if self.local_lyapunov and not self.lyapunov:
            raise ValueError("local_lyapunov=True needs lyapunov=True")
        sv = self.singular_values
        if not isinstance(sv, (bool, int, np.integer)):
            raise TypeError(f"singular_values must be True, False or an integer k >= 1 (the top k); got {sv!r}")
        if not isinstance(sv, bool) and sv < 1:
            raise ValueError(f"singular_values must be True, False or an integer k >= 1 (the top k); got {sv!r}")
        check_positive_int("k", self.k, allow_none=True)
        check_int_or_auto("warmup", self.warmup, minimum=0)
        check_int_or_auto("tangent_warmup", self.tangent_warmup, minimum=0)
        check_int_or_auto("reortho_every", self.reortho_every)
        check_positive_int("time_chunk", self.time_chunk, allow_none=True)
        check_choice("state", self.state, STATES)
        check_choice("method", self.method, METHODS)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))):
            raise ValueError(f"seed must be an integer or None; got {self.seed!r}")
        for name in ("k", *_AUTO, "time_chunk", "seed"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, int(value))  # numpy integers -> int (JSON)
        if not isinstance(sv, bool):
            object.__setattr__(self, "singular_values", int(sv))
        object.__setattr__(self, "ci", _confidence_level(self.ci))
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        object.__setattr__(self, "device", _device_name(self.device))

    def check(self, problem) -> None:
        """The checks that need the model and the inputs (``k <= D``, top-k ``singular_values <= D``, transients
        shorter than ``T``).

        ``problem`` is a :class:`rnnjac._checks.Problem`; raises ``ValueError`` naming the keyword.
        """
        check_lyapunov_options(
            problem, self.k, self.warmup, self.tangent_warmup, self.reortho_every, lyapunov=self.lyapunov, auto=True
        )
        d, sv = problem.dyn.size(problem.state), self.singular_values
        if not isinstance(sv, bool) and sv > d:
            raise ValueError(
                f"singular_values must be True, False or an integer k with 1 <= k <= D = {d} "
                f"(state={problem.state!r}); got {sv!r}"
            )

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """``dtype`` as a ``torch.dtype`` (None: the model's own)."""
        return None if self.dtype is None else getattr(torch, self.dtype)

    def generator(self) -> torch.Generator | None:
        """A fresh CPU generator seeded with ``seed`` (None: torch's global random state)."""
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)

    def to_json(self) -> str:
        """Every field as a JSON object (keys sorted): what the output's ``options_json`` attribute holds."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SpectraOptions:
        """The options stored by :meth:`to_json` (validated again); unknown keys are refused."""
        values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"options_json must be a JSON object; got {type(values).__name__}")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"options_json has unknown keys {unknown}; known: {[f.name for f in fields(cls)]}")
        return cls(**values)
