"""Trained checkpoints -> ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (or cells), inferred from weight shapes.

Accepted files:

- a ``state_dict`` of a recurrent module, or of a larger model containing one or more (keys
  ``<prefix>weight_hh_l0`` ...; cells: ``<prefix>weight_hh``);
- a dict wrapping a state dict under ``state_dict`` (PyTorch Lightning), ``model_state_dict`` or
  ``model`` (common training scripts), possibly with ``step``/``global_step``/``epoch`` beside it;
- ``.safetensors`` files (metadata ``arch``, ``nonlinearity``, ``step`` are used when present);
- a whole pickled module only with ``unsafe=True``: everything else is read with
  ``torch.load(weights_only=True)``, which refuses to run code embedded in a pickle.

Gate blocks give the architecture (1 = RNN, 3 = GRU, 4 = LSTM); ``weight_hr_l0`` gives
``proj_size``; ``bias_ih_l0`` gives ``bias``. ``tanh`` vs ``relu`` cannot be inferred from weights:
it is taken from the file's metadata (or the pickled module), else it must be given with
``nonlinearity=`` (recorded in ``module.rnnjac_info["nonlinearity_source"]``); an ``nn.RNN`` is never
silently assumed to be ``tanh``.

Only regular files are read (a FIFO or device is refused before it is opened). A file that is not a
well-formed checkpoint is reported as such; the advice to pass ``unsafe=True`` is reserved for a
well-formed pickle that holds Python objects other than tensors.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import pickletools
import re
import stat
import types
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._checks import check_choice
from .errors import CheckpointError

__all__ = ["load_checkpoint", "inspect_checkpoint", "checkpoint_info", "sha256"]

ARCHS = ("rnn", "gru", "lstm")
_GATES = {1: "rnn", 3: "gru", 4: "lstm"}
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
_STEP_KEYS = ("global_step", "step", "iteration", "epoch")


def checkpoint_info(module: nn.Module) -> dict[str, Any]:
    """What :func:`load_checkpoint` inferred about ``module`` (sizes, prefix, nonlinearity, metadata).

    Examples
    --------
    >>> import torch, rnnjac, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
    >>> torch.save({"state_dict": torch.nn.LSTM(2, 4).state_dict(), "epoch": 7}, path)
    >>> rnnjac._checkpoints.checkpoint_info(rnnjac.load_checkpoint(path))["training_step"]
    7
    """
    info = module.__dict__.get("rnnjac_info")
    if info is None:
        raise ValueError("this module was not built by rnnjac.load_checkpoint (it has no rnnjac_info)")
    return info


def sha256(path) -> str:
    """Hex SHA-256 of a file's bytes (a regular file: a FIFO or device is refused).

    Examples
    --------
    >>> import rnnjac, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "empty.pt")
    >>> open(path, "wb").close()
    >>> rnnjac._checkpoints.sha256(path)[:12]
    'e3b0c44298fc'
    """
    _check_regular_file(Path(path))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_regular_file(path: Path) -> None:
    """Refuse anything but a regular file (after symlinks) before opening it: a FIFO would block."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not stat.S_ISREG(mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "not a regular file"
        raise CheckpointError(f"{path} is {kind}; a checkpoint must be a regular file")


def _read(path: Path, *, unsafe: bool, map_location):
    """(object, metadata) from a file."""
    _check_regular_file(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device=str(map_location)) as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable .safetensors file ({err})") from err
        return tensors, meta
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # torch.save zip archive, or a raw pickle
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a torch.save archive nor a pickle)")
    try:
        return _torch_load(path, map_location, weights_only=True), {}
    except pickle.UnpicklingError as err:
        broken, refused = _scan_pickle(path)
        if broken or not refused:
            reason = broken or f"weights_only loading failed: {_first_line(err)}"
            raise CheckpointError(f"{path} is not a readable checkpoint ({reason})") from None
        if not unsafe:
            names = ", ".join(refused[:3]) + (", ..." if len(refused) > 3 else "")
            raise CheckpointError(
                f"{path} holds pickled Python objects that weights_only loading refuses (it refers to {names}, "
                "not only tensors): a whole module, or code; load it with unsafe=True only if you trust its "
                "source (unpickling runs code from the file)"
            ) from None
    return _torch_load(path, map_location, weights_only=False), {}


def _first_line(err: BaseException) -> str:
    if isinstance(err, EOFError):
        return "EOFError: the data ends early; the file is truncated"
    text = str(err)
    keep = [ln.strip() for ln in text.splitlines() if ln.strip().startswith(("Unsupported", "Invalid", "invalid"))]
    line = keep[0] if keep else (text.splitlines() or [""])[0].strip()
    if len(line) > 120:  # torch's messages go on with advice after the first sentence
        line = line.split(". ")[0]
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of torch's legacy (non-zip) format


def _py3_name(module: str, name: str) -> str:
    """``module.name`` with protocol-2 module names mapped to Python 3's (as unpickling does)."""
    module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
    return f"{module}.{name}"


def _globals_of(f) -> list[str]:
    """``module.name`` of every global one pickle (read from ``f``) refers to. Decodes opcodes, runs nothing;
    raises on a malformed stream."""
    found, recent, memo = [], [], {}
    for op, arg, _ in pickletools.genops(f):
        name = op.name
        if name in ("GLOBAL", "INST"):
            found.append(_py3_name(*arg.split(" ", 1)))
        elif name == "STACK_GLOBAL":
            found.append(_py3_name(str(recent[-2] if len(recent) > 1 else "?"), str(recent[-1] if recent else "?")))
        elif name in _STRING_OPS:
            recent.append(arg)
        elif name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            memo[len(memo) if name == "MEMOIZE" else arg] = recent[-1] if recent else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            recent.append(memo.get(arg))
        elif name == "LONG1" and arg == _LEGACY_MAGIC:
            found.append("<legacy>")
        else:
            recent.append(None)
    return found


def _scan_pickle(path: Path) -> tuple[str | None, list[str]]:
    """``(problem, globals)``: why the file's pickle data is not well formed (None if it is), and the globals
    it refers to that weights_only loading does not allow."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return "a zip archive without the data.pkl of torch.save", []
                with z.open(name) as f:
                    names = _globals_of(f)
        else:
            with open(path, "rb") as f:
                names = _globals_of(f)
                if "<legacy>" not in names:  # torch.load reads the magic number first: fails after unpickling
                    return "a plain pickle, not written by torch.save", []
                names = [n for _ in range(4) for n in _globals_of(f)]  # protocol, sys info, object, storage keys
    except Exception as err:  # zipfile/pickletools raise various types on garbage
        return f"corrupt data: {type(err).__name__}: {err}", []
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except Exception:  # private API: without it, report every global
        allowed = set()
    allowed |= {
        f"{g.__module__}.{g.__qualname__}" for g in torch.serialization.get_safe_globals() if hasattr(g, "__module__")
    }
    return None, [n for n in dict.fromkeys(names) if n not in allowed]


def _torch_load(path: Path, map_location, *, weights_only: bool):
    """``torch.load`` with torch's own advice-laden warnings silenced; a missing class becomes a
    :class:`CheckpointError` that says it must be importable."""
    kw = {} if weights_only else {"pickle_module": _NAMING_PICKLE}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol ... please file an issue"
            return torch.load(path, map_location=map_location, weights_only=weights_only, **kw)
    except _MissingClass as err:
        raise CheckpointError(
            f"{path} needs the class {err.qualname}, which cannot be imported here ({err.reason}): a whole "
            "pickled module can only be loaded where the code that defines its class is importable; install "
            "the package that defines it or add its folder to PYTHONPATH (or save the model's state_dict() "
            "instead, which needs no code)"
        ) from None
    except pickle.UnpicklingError:
        if weights_only:
            raise  # the caller tells a refused global from a corrupt file
        reason = _scan_pickle(path)[0] or "corrupt pickle data"
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason})") from None
    except Exception as err:  # torch's readers fail on garbage with many types (IndexError, RuntimeError, ...)
        reason = _first_line(err) if isinstance(err, (RuntimeError, EOFError)) else None
        reason = reason or _scan_pickle(path)[0] or _first_line(err)
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason})") from None


class _MissingClass(Exception):
    def __init__(self, module: str, name: str, err: BaseException):
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"
        self.reason = f"{type(err).__name__}: {err}"


class _NamingUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose failure to find a class names it (``module.name``)."""

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError) as err:
            raise _MissingClass(module, name, err) from err


def _naming_load(file, **kwargs):
    return _NamingUnpickler(file, **kwargs).load()


_NAMING_PICKLE = types.ModuleType("rnnjac_naming_pickle")
_NAMING_PICKLE.__dict__.update(
    {k: getattr(pickle, k) for k in ("Pickler", "dump", "dumps", "UnpicklingError", "HIGHEST_PROTOCOL")},
    Unpickler=_NamingUnpickler,
    load=_naming_load,
)


def _unwrap(obj, meta: dict):
    """Descend into wrapper dicts; collect step metadata on the way."""
    while isinstance(obj, Mapping):
        for key in _STEP_KEYS:
            if key in obj and isinstance(obj[key], (int, float)) and "step" not in meta:
                meta["step"] = str(int(obj[key]))
        for key in ("arch", "nonlinearity"):
            if isinstance(obj.get(key), str) and key not in meta:
                meta[key] = obj[key]
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), (Mapping, nn.Module))), None)
        if inner is None or any(isinstance(v, torch.Tensor) and "weight_hh" in k for k, v in obj.items()):
            return obj
        obj = inner
    return obj


def _groups(state: Mapping) -> dict[str, dict]:
    """Recurrent weight groups by prefix: {prefix: {"cell": bool, "bidirectional": bool}}."""
    out: dict[str, dict[str, bool]] = {}
    for key in state:
        m = re.match(r"^(.*?)weight_hh(_l0)?(_reverse)?$", key)
        if not m:
            continue
        prefix = m.group(1)
        g = out.setdefault(prefix, {"cell": m.group(2) is None, "bidirectional": False})
        g["bidirectional"] |= m.group(3) is not None
    return out


def _bidirectional_error(where: str) -> ValueError:
    return ValueError(
        f"{where} is bidirectional: not one causal dynamical system (its backward direction runs from "
        "t=T down to 1); analyse each direction as its own unidirectional model"
    )


def _infer(state: Mapping, prefix: str, cell: bool) -> dict:
    get = lambda name: state.get(prefix + name)  # noqa: E731
    sfx = "" if cell else "_l0"
    w_hh, w_ih, w_hr = get("weight_hh" + sfx), get("weight_ih" + sfx), get("weight_hr" + sfx)
    if w_hh is None or w_ih is None:
        raise CheckpointError(f"found {prefix}weight_hh{sfx} but no {prefix}weight_ih{sfx}")
    if w_hr is not None:
        proj, hidden = w_hr.shape
    else:
        proj, hidden = 0, w_hh.shape[1]
    gates, rem = divmod(w_hh.shape[0], hidden)
    if rem or gates not in _GATES:
        raise CheckpointError(
            f"{prefix}weight_hh{sfx} has shape {tuple(w_hh.shape)}: not 1, 3 or 4 gate blocks of the hidden "
            f"size {hidden}"
        )
    layers = 1 if cell else sum(1 for k in state if re.fullmatch(re.escape(prefix) + r"weight_hh_l\d+", k))
    return {
        "arch": _GATES[gates],
        "input_size": int(w_ih.shape[1]),
        "hidden_size": int(hidden),
        "num_layers": int(layers),
        "bias": (prefix + "bias_ih" + sfx) in state,
        "proj_size": int(proj),
        "cell": cell,
        "prefix": prefix,
    }


def _build(info: dict, nonlinearity: str) -> nn.Module:
    arch, i, h = info["arch"], info["input_size"], info["hidden_size"]
    if info["cell"]:
        cls = {"rnn": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}[arch]
        kw: dict[str, Any] = {"nonlinearity": nonlinearity} if arch == "rnn" else {}
        return cls(i, h, bias=info["bias"], **kw)
    kw = {"num_layers": info["num_layers"], "bias": info["bias"], "batch_first": True}
    if arch == "rnn":
        return nn.RNN(i, h, nonlinearity=nonlinearity, **kw)
    if arch == "gru":
        return nn.GRU(i, h, **kw)
    return nn.LSTM(i, h, proj_size=info["proj_size"], **kw)


def _module_from_object(obj, prefix):
    """A recurrent submodule of a whole (unsafely loaded) module."""
    found = {
        name + "." if name else "": m for name, m in obj.named_modules() if isinstance(m, (nn.RNNBase, nn.RNNCellBase))
    }
    if not found:
        raise CheckpointError(f"the pickled {type(obj).__name__} contains no nn.RNN/GRU/LSTM or cell")
    if prefix is None and len(found) > 1:
        raise CheckpointError(f"the module contains several recurrent modules {sorted(found)}; pick one with prefix=")
    key = prefix if prefix is not None else next(iter(found))
    if key not in found:
        raise CheckpointError(f"prefix {key!r} not found; recurrent modules: {sorted(found)}")
    return found[key], key


def inspect_checkpoint(path, *, prefix=None, unsafe=False, map_location="cpu") -> dict:
    """What :func:`load_checkpoint` would build, without building it (architecture, sizes, prefix, metadata).

    Unlike :func:`load_checkpoint`, an ``nn.RNN`` whose file does not record its nonlinearity is not an
    error here: ``nonlinearity`` is reported as ``"unknown"``.

    Examples
    --------
    >>> import torch, rnnjac, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "r.pt")
    >>> torch.save(torch.nn.RNN(3, 8).state_dict(), path)
    >>> info = rnnjac._checkpoints.inspect_checkpoint(path)
    >>> info["arch"], info["hidden_size"], info["nonlinearity"]
    ('rnn', 8, 'unknown')
    """
    return _load(Path(path), arch=None, nonlinearity=None, prefix=prefix, unsafe=unsafe, map_location=map_location)[1]


def _load(path: Path, *, arch, nonlinearity, prefix, unsafe, map_location):
    if arch is not None:
        check_choice("arch", arch, ARCHS)
    if nonlinearity is not None:
        check_choice("nonlinearity", nonlinearity, ("tanh", "relu"))
    obj, meta = _read(path, unsafe=unsafe, map_location=map_location)
    obj = _unwrap(obj, meta)
    if isinstance(obj, nn.Module):
        module, key = _module_from_object(obj, prefix)
        state = {key + k: v for k, v in module.state_dict().items()}
        if isinstance(module, nn.RNNBase) and module.bidirectional:
            raise _bidirectional_error(f"the module at {key or '<root>'!r}")
        if isinstance(module, (nn.RNN, nn.RNNCell)):
            meta["nonlinearity"] = module.nonlinearity  # recorded by the module itself
        prefix = key
    elif isinstance(obj, Mapping):
        state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    else:
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or module")
    groups = _groups(state)
    if not groups:
        some = ", ".join(list(state)[:6]) or "no tensors"
        raise CheckpointError(f"no recurrent weights (keys ending in weight_hh_l0) in {path}; found: {some}")
    if prefix is None:
        if len(groups) > 1:
            names = ", ".join(repr(p) for p in sorted(groups))
            raise CheckpointError(f"{path} contains several recurrent modules: {names}; choose one with prefix=")
        prefix = next(iter(groups))
    elif prefix not in groups:
        names = ", ".join(repr(p) for p in sorted(groups))
        raise CheckpointError(f"prefix {prefix!r} not in {path}; recurrent modules found: {names}")
    if groups[prefix]["bidirectional"]:
        raise _bidirectional_error(f"the recurrent module {prefix or '<root>'!r} in {path}")
    info = _infer(state, prefix, groups[prefix]["cell"])
    if arch is not None and arch != info["arch"]:
        raise CheckpointError(f"arch={arch!r} but the weight shapes are those of {info['arch']!r}")
    nonlinearity, source = _nonlinearity(info, nonlinearity, meta, path)
    info.update(
        nonlinearity=nonlinearity,
        nonlinearity_source=source,
        path=str(path),
        metadata=meta,
        training_step=_training_step(meta, path),
    )
    return state, info


def _nonlinearity(info: dict, given: str | None, meta: dict, path: Path) -> tuple[str, str]:
    """``(nonlinearity, source)``: ``("", "")`` for GRU/LSTM, ``("unknown", ...)`` for an nn.RNN whose
    file does not record it and for which none was given."""
    recorded = meta.get("nonlinearity") if meta.get("nonlinearity") in ("tanh", "relu") else None
    if info["arch"] != "rnn":
        if given is not None:
            raise CheckpointError(
                f"nonlinearity= applies to nn.RNN only; this checkpoint is a {info['arch'].upper()} "
                f"({path}): leave nonlinearity out"
            )
        return "", ""
    if given is not None:
        if recorded is not None and recorded != given:
            raise CheckpointError(
                f"nonlinearity={given!r} but {path} records nonlinearity {recorded!r}; leave nonlinearity out "
                "or fix the file"
            )
        return given, "given"
    if recorded is not None:
        return recorded, "checkpoint metadata"
    return "unknown", "not recorded in the checkpoint; not inferable from weights"


def _training_step(meta: dict, path: Path) -> int | None:
    if "step" in meta:
        try:
            return int(float(meta["step"]))
        except ValueError:
            pass
    m = re.search(r"(?:step|iter|it|epoch)[=_-]?(\d+)", path.stem)
    if m:
        return int(m.group(1))
    return None


def load_checkpoint(
    path,
    *,
    arch: str | None = None,
    nonlinearity: str | None = None,
    prefix: str | None = None,
    unsafe: bool = False,
    map_location="cpu",
) -> nn.Module:
    """Build the recurrent module stored in a checkpoint.

    Parameters
    ----------
    path : str or Path
        ``.pt``/``.pth``/``.ckpt`` (state dict, wrapped state dict, or with ``unsafe=True`` a whole
        pickled module) or ``.safetensors``.
    arch : {"rnn", "gru", "lstm"}, optional
        Checked against the architecture inferred from the weight shapes.
    nonlinearity : {"tanh", "relu"}, optional
        For ``nn.RNN``/``nn.RNNCell`` only (an error for GRU/LSTM). Not inferable from weights: required
        unless the file records it (safetensors metadata ``nonlinearity``, a ``"nonlinearity"`` entry
        beside the state dict, or a whole pickled module); an error if it contradicts the record.
    prefix : str, optional
        Which recurrent module to take when the file holds several (e.g. ``"encoder.rnn."``).
    unsafe : bool
        Allow unpickling arbitrary objects (runs code from the file: only for trusted files). The
        classes of the pickled objects must be importable.
    map_location : str or torch.device
        Where tensors are loaded.

    Raises
    ------
    CheckpointError
        The file is not a regular file, not a readable checkpoint, holds pickled objects and
        ``unsafe`` is False, or the options do not fit it (e.g. an ``nn.RNN`` without
        ``nonlinearity=``).

    Returns
    -------
    torch.nn.Module
        An ``nn.RNN``/``nn.GRU``/``nn.LSTM`` with ``batch_first=True`` (or a cell) holding the
        weights, in ``eval()`` mode, with a ``rnnjac_info`` dict attribute (inferred sizes, prefix,
        nonlinearity and its source, metadata, training step).

    Examples
    --------
    >>> import torch, rnnjac, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
    >>> torch.save({"model_state_dict": torch.nn.GRU(3, 8, num_layers=2).state_dict()}, path)
    >>> rnnjac.load_checkpoint(path)
    GRU(3, 8, num_layers=2, batch_first=True)
    """
    state, info = _load(
        Path(path), arch=arch, nonlinearity=nonlinearity, prefix=prefix, unsafe=unsafe, map_location=map_location
    )
    if info["nonlinearity"] == "unknown":
        raise CheckpointError(
            f"{path} holds an nn.RNN{'Cell' if info['cell'] else ''} whose nonlinearity it does not record, and "
            "the nonlinearity of an nn.RNN cannot be inferred from its weights: give it with "
            "nonlinearity='tanh' or nonlinearity='relu'"
        )
    module = _build(info, info["nonlinearity"] or "tanh")
    p = info["prefix"]
    own = {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}
    wanted = module.state_dict()
    sub = {k: own[k] for k in wanted if k in own}
    missing = sorted(set(wanted) - set(sub))
    if missing:
        raise CheckpointError(f"the checkpoint lacks {', '.join(p + m for m in missing)} for a {info['arch']} module")
    dtype = sub["weight_hh" + ("" if info["cell"] else "_l0")].dtype
    module = module.to(dtype=dtype, device=map_location)
    module.load_state_dict(sub, strict=True)
    module.eval()
    module.rnnjac_info = info
    return module
