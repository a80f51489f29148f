"""From a checkpoint on disk to a spectra Dataset: inputs, options, provenance.

Shared by the command line (``rnnjac analyze``/``verify``) and by sweeps over many checkpoints
(:func:`rnnjac.analyze_checkpoints`), so both record the same attributes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ._checkpoints import checkpoint_info, load_checkpoint, sha256
from ._checks import NonFiniteError, check_choice, check_positive_int, first_nonfinite_step
from ._options import SpectraOptions
from ._spectra import spectra

__all__ = [
    "InputSpec",
    "SpectraOptions",
    "check_device",
    "check_input_spec",
    "load_inputs",
    "make_inputs",
    "analyze_checkpoint",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
"""The ``dtype`` names the command line offers."""
H0_CHOICES = ("zeros", "random")
_DEVICE = re.compile(r"(cpu|cuda)(:(\d+))?")


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


def check_device(device) -> torch.device:
    """The ``torch.device`` for ``device`` (``'cpu'``, ``'cuda'`` or ``'cuda:N'``), checked before any work.

    Raises ``ValueError`` for another name, and when CUDA (or device ``N``) is not available here.

    Examples
    --------
    >>> check_device("cpu")
    device(type='cpu')
    >>> check_device("gpu")
    Traceback (most recent call last):
    ...
    ValueError: device must be cpu, cuda or cuda:N; got 'gpu'
    """
    name = str(device)
    match = _DEVICE.fullmatch(name)
    if match is None:
        raise ValueError(f"device must be cpu, cuda or cuda:N; got {device!r}")
    if match.group(1) == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={name!r} was asked for but CUDA is not available on this machine "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})"
            )
        index = match.group(3)
        if index is not None and int(index) >= torch.cuda.device_count():
            raise ValueError(
                f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0 ...)"
            )
    return torch.device(name)


def _pick(arrays: dict, key: str | None, path) -> np.ndarray:
    if key is not None:
        if key not in arrays:
            raise ValueError(f"{path} has no array {key!r}; it has {sorted(arrays)}")
        return arrays[key]
    if len(arrays) != 1:
        raise ValueError(f"{path} holds several arrays {sorted(arrays)}; choose one with key=")
    return next(iter(arrays.values()))


def load_inputs(path, *, key: str | None = None, time_major: bool = False) -> torch.Tensor:
    """Read ``(B, T, I)`` inputs (or ``(T, B, I)`` with ``time_major``) from .npy/.npz/.pt/.nc."""
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
    if arr.ndim != 3:
        raise ValueError(
            f"inputs in {path} must be 3-D (B, T, I) (or (T, B, I) with time_major=True); got shape {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"inputs in {path} must be floating point; got {arr.dtype}")
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


def analyze_checkpoint(
    path,
    inputs: InputSpec,
    options: SpectraOptions,
    *,
    load_kwargs: dict | None = None,
    progress: bool = False,
    command: str = "",
):
    """Load one checkpoint, build its inputs and return its spectra Dataset with provenance attrs.

    ``options`` (a :class:`SpectraOptions`, passed whole to :func:`rnnjac.spectra`) says what to compute; its
    ``device`` (default the CPU) and ``dtype`` (default the checkpoint's) also place the inputs, and its ``seed``
    seeds the tangent basis.
    """
    from ._dynamics import as_dynamics

    check_input_spec(inputs)
    if not isinstance(options, SpectraOptions):
        raise TypeError(f"options must be a SpectraOptions; got {type(options).__name__}")
    device = check_device(options.device or "cpu")
    module = load_checkpoint(path, **(load_kwargs or {}))
    info = checkpoint_info(module)
    dtype = options.torch_dtype or next(module.parameters()).dtype
    x = make_inputs(inputs, info["input_size"], dtype)
    dyn = as_dynamics(module)
    h0 = make_h0(inputs, dyn.state_size, x.shape[0], dtype)
    if h0 is not None:
        h0 = h0.to(device)
    attrs = {
        "checkpoint": str(path),
        "checkpoint_sha256": sha256(path),
        "command": command,
        "inputs": inputs.describe(),
        "nonlinearity": info["nonlinearity"],
        "nonlinearity_source": info["nonlinearity_source"],
        "checkpoint_prefix": info["prefix"],
        "training_step": -1 if info["training_step"] is None else int(info["training_step"]),
        "inputs_json": json.dumps(asdict(inputs), sort_keys=True),
    }
    return spectra(module, x.to(device), h0, options=options, progress=progress, attrs=attrs)
