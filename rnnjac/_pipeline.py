"""From a checkpoint on disk to a spectra Dataset: inputs, options, provenance.

Shared by the command line (``rnnjac analyze``/``verify``) and by sweeps over many checkpoints
(:func:`rnnjac.analyze_checkpoints`), so both record the same attributes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ._checkpoints import _training_step, checkpoint_info, load_checkpoint, sha256
from ._checks import NonFiniteError, check_choice, check_device, check_positive_int, first_nonfinite_step
from ._dynamics import as_dynamics
from ._lyapunov_check import check_options, verify_lyapunov
from ._options import SpectraOptions
from ._sensitivity import _check_max_lag as check_max_lag
from ._spectra import spectra
from ._user_model import ModelSpec, load_model

log = logging.getLogger(__name__)

__all__ = [
    "InputSpec",
    "ModelSpec",
    "SpectraOptions",
    "check_device",
    "check_input_spec",
    "load_inputs",
    "make_inputs",
    "analyze_checkpoint",
    "lyapunov_check_attrs",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
"""The ``dtype`` names the command line offers."""
H0_CHOICES = ("zeros", "random")


@dataclass
class InputSpec:
    """Where the inputs of an analysis come from: a file, or a seeded generator."""

    path: str | None = None
    key: str | None = None
    time_major: bool = False
    batch: int = 8
    steps: int = 200
    input_std: float = 1.0
    autonomous: bool = False
    h0: str = "zeros"  # or "random"
    seed: int = 0

    def describe(self) -> str:
        if self.path:
            return (
                f"file {self.path}"
                + (f" [{self.key}]" if self.key else "")
                + (" (time-major)" if self.time_major else "")
            )
        kind = "zeros (autonomous)" if self.autonomous else f"Gaussian, std {self.input_std:g}"
        return f"generated: batch {self.batch}, steps {self.steps}, {kind}, seed {self.seed}"


def check_input_spec(spec: InputSpec) -> InputSpec:
    """Raise ``ValueError`` naming the field if an :class:`InputSpec` value is invalid; return ``spec``.

    ``batch`` and ``steps`` must be integers >= 1, ``input_std`` a finite number > 0, ``h0`` one of
    ``'zeros'``/``'random'`` and ``seed`` an integer. Checked before any work, also when the inputs
    come from a file (the values then go unused but are recorded in the provenance).

    Examples
    --------
    >>> check_input_spec(InputSpec(batch=2)).batch
    2
    >>> check_input_spec(InputSpec(input_std=-1.0))
    Traceback (most recent call last):
    ...
    ValueError: input_std must be a finite number > 0; got -1.0
    """
    check_positive_int("batch", spec.batch)
    check_positive_int("steps", spec.steps)
    std = spec.input_std
    if isinstance(std, bool) or not isinstance(std, (int, float, np.number)) or not (math.isfinite(std) and std > 0):
        raise ValueError(f"input_std must be a finite number > 0; got {std!r}")
    check_choice("h0", spec.h0, H0_CHOICES)
    if isinstance(spec.seed, bool) or not isinstance(spec.seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer; got {spec.seed!r}")
    return spec


def _pick(arrays: dict, key: str | None, path) -> np.ndarray:
    if key is not None:
        if key not in arrays:
            raise ValueError(f"{path} has no array {key!r}; it has {sorted(arrays)}")
        return arrays[key]
    if len(arrays) != 1:
        raise ValueError(f"{path} holds several arrays {sorted(arrays)}; choose one with key=")
    return next(iter(arrays.values()))


def load_array(path, *, key: str | None = None) -> np.ndarray:
    """The array in a .npy/.npz/.pt/.nc file (``key``: which one when the file holds several)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"inputs file {path} does not exist")
    suffix = path.suffix
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            arr = _pick({k: z[k] for k in z.files}, key, path)
    elif suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            obj = _pick({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, key, path)
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"{path} holds a {type(obj).__name__}, expected a tensor or a dict of tensors")
        arr = obj.numpy()
    elif suffix == ".nc":
        import xarray as xr

        with xr.open_dataset(path, engine="h5netcdf") as ds:
            arr = _pick({k: v.values for k, v in ds.data_vars.items()}, key, path)
    else:
        raise ValueError(f"inputs must be .npy, .npz, .pt or .nc; got {path.name}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"inputs in {path} must be floating point; got {arr.dtype}")
    return arr


def load_inputs(path, *, key: str | None = None, time_major: bool = False) -> torch.Tensor:
    """Read ``(B, T, I)`` inputs (or ``(T, B, I)`` with ``time_major``) from .npy/.npz/.pt/.nc."""
    arr = load_array(path, key=key)
    if arr.ndim != 3:
        raise ValueError(
            f"inputs in {path} must be 3-D (B, T, I) (or (T, B, I) with time_major=True); got shape {arr.shape}"
        )
    x = torch.from_numpy(np.ascontiguousarray(arr))
    return x.transpose(0, 1).contiguous() if time_major else x


def make_inputs(spec: InputSpec, input_size: int, dtype=torch.float32) -> torch.Tensor:
    """Inputs for an analysis as ``(B, T, I)`` in ``dtype``, from a file or the seeded generator."""
    check_input_spec(spec)
    if spec.path:
        x = load_inputs(spec.path, key=spec.key, time_major=spec.time_major).to(dtype)
    else:
        if spec.autonomous:
            x = torch.zeros(spec.batch, spec.steps, input_size, dtype=dtype)
        else:
            g = torch.Generator().manual_seed(spec.seed)
            x = (torch.randn(spec.batch, spec.steps, input_size, generator=g, dtype=torch.float64) * spec.input_std).to(
                dtype
            )
    t_bad = first_nonfinite_step(x, 1)
    if t_bad is not None:
        raise NonFiniteError(f"inputs contain NaN/Inf, first at step t={t_bad + 1}")
    return x


def make_h0(spec: InputSpec, dyn_state_size: int, batch: int, dtype) -> torch.Tensor | None:
    check_input_spec(spec)
    if spec.h0 == "zeros":
        return None
    g = torch.Generator().manual_seed(spec.seed + 1)
    return (0.5 * torch.randn(batch, dyn_state_size, generator=g, dtype=torch.float64)).to(dtype)


def tensor_digest(x) -> str:
    """SHA-256 of a tensor's (or a tuple of tensors') shape, dtype and bytes: what identifies given inputs."""
    h = hashlib.sha256()
    for t in x if isinstance(x, (tuple, list)) else (x,):
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _as_tensor(name: str, value) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name} must be a tensor or array, a file path, or None (generated inputs); got {type(value).__name__}"
        )
    if not value.is_floating_point():
        raise ValueError(f"{name} must be floating point; got {value.dtype}")
    return value.detach().cpu().contiguous()


def as_inputs(inputs):
    """``inputs`` of an analysis as an :class:`InputSpec` (None: generated defaults; a path: that file) or a
    checked ``(B, T, I)`` CPU tensor (a tensor or array), validated before any work."""
    if inputs is None:
        return InputSpec()
    if isinstance(inputs, InputSpec):
        return check_input_spec(inputs)
    if isinstance(inputs, (str, os.PathLike)):
        return check_input_spec(InputSpec(path=os.fspath(inputs)))
    x = _as_tensor("inputs", inputs)
    if x.dim() != 3:
        raise ValueError(f"inputs must be 3-D (B, T, I), batch first; got shape {tuple(x.shape)}")
    t_bad = first_nonfinite_step(x, 1)
    if t_bad is not None:
        raise NonFiniteError(f"inputs contain NaN/Inf, first at step t={t_bad + 1}")
    return x


def as_h0(h0):
    """A given initial state (tensor, array or LSTM ``(h, c)`` tuple) as CPU tensors; None stays None."""
    if h0 is None:
        return None
    if isinstance(h0, (tuple, list)):
        return tuple(_as_tensor("h0", v) for v in h0)
    return _as_tensor("h0", h0)


def describe_inputs(inputs) -> tuple[str, str]:
    """``(description, JSON)`` of an analysis' inputs for the provenance attrs."""
    if isinstance(inputs, InputSpec):
        return inputs.describe(), json.dumps(asdict(inputs), sort_keys=True)
    digest = tensor_digest(inputs)
    shape = tuple(inputs.shape)
    text = f"tensor of shape {shape} ({str(inputs.dtype).replace('torch.', '')}), sha256 {digest[:16]}"
    return text, json.dumps({"tensor_shape": list(shape), "tensor_sha256": digest}, sort_keys=True)


def _to(h0, device, dtype):
    if h0 is None:
        return None
    if isinstance(h0, tuple):
        return tuple(v.to(device=device, dtype=dtype) for v in h0)
    return h0.to(device=device, dtype=dtype)


@contextmanager
def stage(what: str):
    """Log ``what`` when it starts and how long it took when it is done, on the ``rnnjac`` logger at INFO (the
    lines ``rnnjac -v`` shows; in Python, ``logging.getLogger("rnnjac").setLevel(logging.INFO)`` with a handler).

    Examples
    --------
    >>> with stage("nothing"):
    ...     pass
    """
    log.info("%s ...", what)
    t0 = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", what, time.perf_counter() - t0)


def _log_target(module, x, dtype, device, described: str) -> None:
    log.info("model %s; inputs %s of shape %s, %s on %s", module, described, tuple(x.shape), dtype, device)


def analyze_checkpoint(
    path,
    inputs,
    options: SpectraOptions,
    *,
    h0=None,
    model: ModelSpec | None = None,
    load_kwargs: dict | None = None,
    progress: bool = False,
    command: str = "",
    check_lyapunov: bool = False,
    max_lag: int | None = None,
):
    """Load one checkpoint, build its inputs and return its spectra Dataset with provenance attrs.

    ``inputs`` is an :class:`InputSpec` (a file or generated inputs) or a ``(B, T, I)`` tensor (see
    :func:`as_inputs`); ``h0`` a given initial state (the module's format or flat ``(B, D)``). ``options`` (a
    :class:`SpectraOptions`, passed whole to :func:`rnnjac.spectra`) says what to compute; its ``device`` (default
    the CPU) and ``dtype`` (default the checkpoint's) also place the inputs, and its ``seed`` seeds the tangent
    basis. ``model`` (a :class:`ModelSpec` with a class) loads the checkpoint into the user's model and analyses
    its recurrent submodule on what the model feeds it. ``check_lyapunov=True`` also checks lambda_1 by direct
    simulation (:func:`rnnjac.verify_lyapunov` on the same model, inputs, warm-ups and seed) and records the result
    as the ``lyapunov_check_*`` attrs (:func:`lyapunov_check_attrs`). ``max_lag`` (an int ``0 <= L < T``) also
    merges in the lagged input sensitivities of :func:`rnnjac.sensitivity` on the same model, inputs, ``h0`` and
    options (:func:`with_sensitivity`); ``max_lag`` is checked against the inputs before any work.
    """
    inputs = as_inputs(inputs)
    if not isinstance(options, SpectraOptions):
        raise TypeError(f"options must be a SpectraOptions; got {type(options).__name__}")
    device = check_device(options.device or "cpu")
    if model is not None and model.model is not None:
        args = (path, inputs, as_h0(h0), options, model, load_kwargs or {}, progress, command, device)
        return _analyze_model(*args, check_lyapunov, max_lag)
    if model is not None and model.submodule is not None:
        raise ValueError("submodule= names a submodule of model=; give model= as well")
    with stage(f"loading {path}"):
        module = load_checkpoint(path, **(load_kwargs or {}))
    info = checkpoint_info(module)
    dtype = options.torch_dtype or next(module.parameters()).dtype
    module = module.to(dtype=dtype)  # the model of the analysis (and of the lambda_1 check) in the inputs' dtype
    if isinstance(inputs, InputSpec):
        x = make_inputs(inputs, info["input_size"], dtype)
        if h0 is None:
            h0 = make_h0(inputs, as_dynamics(module).state_size, x.shape[0], dtype)
    else:
        x = inputs.to(dtype)
    described, inputs_json = describe_inputs(inputs)
    attrs = {
        "checkpoint": str(path),
        "checkpoint_sha256": sha256(path),
        "command": command,
        "inputs": described,
        "nonlinearity": info["nonlinearity"],
        "nonlinearity_source": info["nonlinearity_source"],
        "checkpoint_prefix": info["prefix"],
        "training_step": -1 if info["training_step"] is None else int(info["training_step"]),
        "inputs_json": inputs_json,
    }
    h0 = _to(as_h0(h0), device, dtype)
    _check_before_work(options, x.shape[1], check_lyapunov, max_lag)
    _log_target(module, x, dtype, device, described)
    with stage("spectra"):
        ds = spectra(module, x.to(device), h0, options=options, progress=progress, attrs=attrs)
    if check_lyapunov:
        with stage("checking lambda_1 by direct simulation"):
            ds.attrs.update(lyapunov_check_attrs(module, x.to(device), h0, options, used=ds.attrs))
    return with_sensitivity(ds, module, x.to(device), h0, options, max_lag)


def _check_before_work(options: SpectraOptions, steps: int, check: bool, max_lag) -> None:
    """The options of the lambda_1 check (``check_lyapunov=True``; an ``"auto"`` transient counts as 0 here) and
    ``max_lag`` (None: no sensitivities), checked before the analysis starts."""
    if check:
        warmup, tangent_warmup = transients_used(options, {})
        check_options(10, 1e-7, warmup, tangent_warmup, options.ci or 0.95, steps)
    if max_lag is not None:
        check_max_lag(max_lag, steps)


def transients_used(options: SpectraOptions, attrs) -> tuple[int, int]:
    """``(warmup, tangent_warmup)`` of an analysis: the options' integers, or for ``"auto"`` the steps the run chose
    (its attrs ``warmup_used``/``tangent_warmup_used``; 0 where it recorded none).

    Examples
    --------
    >>> transients_used(SpectraOptions(warmup="auto", tangent_warmup=5), {"warmup_used": 12})
    (12, 5)
    """
    return tuple(
        int(attrs.get(f"{name}_used", 0)) if getattr(options, name) == "auto" else int(getattr(options, name))
        for name in ("warmup", "tangent_warmup")
    )


def with_sensitivity(ds, model, x, h0, options: SpectraOptions, max_lag, *, submodule=None):
    """``ds`` with the lagged input sensitivities of :func:`rnnjac.sensitivity` merged in (``max_lag`` None:
    ``ds`` itself).

    The sensitivities use the analysis' model, inputs, ``h0``, ``state``, ``method``, ``dtype``, ``device`` and
    ``submodule``; ``ds``'s attrs are kept, plus ``max_lag``.

    Examples
    --------
    >>> import torch, rnnjac
    >>> gru, x = torch.nn.GRU(2, 4, batch_first=True), torch.randn(3, 10, 2)
    >>> options = SpectraOptions(lyapunov=False)
    >>> ds = with_sensitivity(rnnjac.spectra(gru, x, options=options), gru, x, None, options, 4)
    >>> ds.input_sensitivity_log_norm.dims, ds.attrs["max_lag"]
    (('batch', 'time', 'lag'), 4)
    """
    if max_lag is None:
        return ds
    import xarray as xr

    from ._sensitivity import sensitivity

    with stage(f"input sensitivities up to lag {max_lag}"):
        sens = sensitivity(
            model,
            x,
            h0,
            max_lag=max_lag,
            state=options.state,
            method=options.method,
            dtype=options.torch_dtype,
            device=options.device,
            submodule=submodule,
        )
    ds = xr.merge([ds, sens], combine_attrs="override")
    ds.attrs["max_lag"] = int(max_lag)
    return ds


def lyapunov_check_attrs(model, x, h0, options: SpectraOptions, *, submodule=None, used=None) -> dict:
    """The ``lyapunov_check_*`` attrs of :func:`rnnjac.verify_lyapunov` run with an analysis' options.

    The check uses the analysis' ``warmup``, ``tangent_warmup``, ``seed``, ``device`` and ``ci`` (0.95 when the
    intervals are off), float64 for built-in modules and a renormalisation every 10 steps; the attrs hold both
    estimates of lambda_1 (nats/step), their standard errors, the difference, the limit it is compared with,
    ``lyapunov_check_passed`` (1/0) and ``lyapunov_check_method`` (a sentence). An ``"auto"`` transient takes the
    steps the analysis chose, from its attrs ``used`` (:func:`transients_used`).

    Examples
    --------
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> rnn = torch.nn.RNN(1, 8, batch_first=True)
    >>> attrs = lyapunov_check_attrs(rnn, torch.randn(4, 120, 1), None, SpectraOptions(warmup=10, seed=0))
    >>> attrs["lyapunov_check_passed"], attrs["lyapunov_check_ci"]
    (1, 0.95)
    """
    warmup, tangent_warmup = transients_used(options, used or {})
    if "auto" in (options.warmup, options.tangent_warmup) and warmup + tangent_warmup + 20 > x.shape[1]:
        raise ValueError(
            f"the Lyapunov check needs warmup + tangent_warmup + 20 <= T = {x.shape[1]} steps; the transients chosen "
            f"by 'auto' are {warmup} + {tangent_warmup} steps: give longer inputs or fixed transients"
        )
    check = verify_lyapunov(
        model,
        x,
        h0,
        warmup=warmup,
        tangent_warmup=tangent_warmup,
        generator=torch.Generator().manual_seed(options.seed or 0),
        ci=options.ci or 0.95,
        device=options.device,
        submodule=submodule,
    )
    attrs = check.attrs()
    attrs["lyapunov_check_method"] = (
        "direct simulation of a perturbed copy of each trajectory (renormalised every 10 steps, relative size 1e-7) "
        "against the QR estimate of lambda_1 (k=1); passed when |difference| <= the normal quantile of ci times "
        "sqrt(dns_stderr^2 + qr_stderr^2)"
    )
    return attrs


def _analyze_model(path, inputs, h0, options, model: ModelSpec, load_kwargs, progress, command, device, check, lag):
    """:func:`analyze_checkpoint` with the user's model class: the submodule on what the model feeds it."""
    extra = sorted(k for k in ("arch", "nonlinearity", "prefix") if load_kwargs.get(k) is not None)
    if extra:
        raise ValueError(
            f"{', '.join(extra)} describe a bare recurrent module; with model= the class says what the checkpoint "
            f"holds: leave {extra[0]} out (submodule= names the recurrent core)"
        )
    with stage(f"loading {path} into {model.model}"):
        whole = load_model(path, model.model, model.model_kwargs, unsafe=bool(load_kwargs.get("unsafe", False)))
    params = next(iter(whole.parameters()), None)
    dtype = options.torch_dtype or (params.dtype if params is not None else torch.float32)
    whole = whole.to(device=device, dtype=dtype)
    if isinstance(inputs, InputSpec):
        if not inputs.path:
            raise ValueError(
                "model= runs the whole model on its own inputs, whose size rnnjac cannot know: give inputs= as a "
                "tensor or a file path"
            )
        if inputs.h0 != "zeros":
            raise ValueError("h0='random' applies to a recurrent module fed directly; with model= leave h0 out")
        x = make_inputs(inputs, 0, dtype)
    else:
        x = inputs.to(dtype)
    described, inputs_json = describe_inputs(inputs)
    step = _training_step_of(path)
    attrs = {
        "checkpoint": str(path),
        "checkpoint_sha256": sha256(path),
        "command": command,
        "inputs": described,
        "inputs_json": inputs_json,
        "model": model.model,
        "model_kwargs": json.dumps(model.model_kwargs, sort_keys=True, default=str),
        "training_step": -1 if step is None else int(step),
    }
    h0 = _to(h0, device, dtype)
    _check_before_work(options, x.shape[1], check, lag)
    _log_target(model.model, x, dtype, device, described)
    with stage("spectra"):
        ds = spectra(
            whole, x.to(device), h0, options=options, submodule=model.submodule, progress=progress, attrs=attrs
        )
    if check:
        with stage("checking lambda_1 by direct simulation"):
            ds.attrs.update(
                lyapunov_check_attrs(whole, x.to(device), h0, options, submodule=model.submodule, used=ds.attrs)
            )
    return with_sensitivity(ds, whole, x.to(device), h0, options, lag, submodule=model.submodule)


def _training_step_of(path):
    """The training step a checkpoint's name says (``step_100.pt``), or None."""
    return _training_step({}, Path(path))
