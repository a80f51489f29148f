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
it is taken from the file's metadata, from ``nonlinearity=``, or assumed ``tanh`` (recorded in
``module.rnnjac_info["nonlinearity_source"]``).
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._checks import check_choice

__all__ = ["load_checkpoint", "inspect_checkpoint", "checkpoint_info", "sha256"]

ARCHS = ("rnn", "gru", "lstm")
_GATES = {1: "rnn", 3: "gru", 4: "lstm"}
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
_STEP_KEYS = ("global_step", "step", "iteration", "epoch")


class CheckpointError(ValueError):
    """The file is not a usable checkpoint (the message says what was found)."""


def checkpoint_info(module: nn.Module) -> dict[str, Any]:
    """What :func:`load_checkpoint` inferred about ``module`` (sizes, prefix, nonlinearity, metadata)."""
    info = module.__dict__.get("rnnjac_info")
    if info is None:
        raise ValueError("this module was not built by rnnjac.load_checkpoint (it has no rnnjac_info)")
    return info


def sha256(path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read(path: Path, *, unsafe: bool, map_location):
    """(object, metadata) from a file."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
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
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not unsafe:
            reason = next((ln.strip() for ln in str(err).splitlines() if ln.strip().startswith("Unsupported")), "")
            raise CheckpointError(
                f"{path} holds pickled Python objects that weights_only loading refuses "
                f"({reason or 'not plain tensors'}): a whole module, or code; load it with unsafe=True (--unsafe) "
                "only if you trust its source"
            ) from err
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(err).__name__}: {err})") from err
    return obj, {}


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
    """What :func:`load_checkpoint` would build, without building it (architecture, sizes, prefix, metadata)."""
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
        if isinstance(module, (nn.RNN, nn.RNNCell)) and nonlinearity is None:
            nonlinearity = module.nonlinearity
            meta["nonlinearity"] = nonlinearity
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
            raise CheckpointError(
                f"{path} contains several recurrent modules: {names}; choose one with prefix= (--prefix)"
            )
        prefix = next(iter(groups))
    elif prefix not in groups:
        names = ", ".join(repr(p) for p in sorted(groups))
        raise CheckpointError(f"prefix {prefix!r} not in {path}; recurrent modules found: {names}")
    if groups[prefix]["bidirectional"]:
        raise _bidirectional_error(f"the recurrent module {prefix or '<root>'!r} in {path}")
    info = _infer(state, prefix, groups[prefix]["cell"])
    if arch is not None and arch != info["arch"]:
        raise CheckpointError(f"arch={arch!r} but the weight shapes are those of {info['arch']!r}")
    if nonlinearity is not None:
        source = "given"
    elif meta.get("nonlinearity") in ("tanh", "relu"):
        nonlinearity, source = meta["nonlinearity"], "checkpoint metadata"
    else:
        nonlinearity, source = "tanh", "assumed (not inferable from weights)"
    info.update(
        nonlinearity=nonlinearity if info["arch"] == "rnn" else "",
        nonlinearity_source=source if info["arch"] == "rnn" else "",
        path=str(path),
        metadata=meta,
        training_step=_training_step(meta, path),
    )
    return state, info


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
        For ``nn.RNN`` (not inferable from weights; default: file metadata, else ``tanh``).
    prefix : str, optional
        Which recurrent module to take when the file holds several (e.g. ``"encoder.rnn."``).
    unsafe : bool
        Allow unpickling arbitrary objects (runs code from the file: only for trusted files).
    map_location : str or torch.device
        Where tensors are loaded.

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
