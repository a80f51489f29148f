"""A checkpoint loaded into the user's own model class, so that its recurrent core is fed what the model feeds it.

``model="package.module:ClassName"`` names the class; it is imported, built with ``model_kwargs`` and the
checkpoint's state dict (read and unwrapped as :func:`rnnjac.load_checkpoint` does, with the same ``unsafe``
rule) is loaded into it strictly: every key the model has must be in the file and nothing else. The analyses then
run the whole model on the caller's inputs and analyse its recurrent submodule on what it receives
(:mod:`rnnjac._submodule`).
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._checkpoints import _load, _read, _unwrap
from ._submodule import describe_ignored
from .errors import CheckpointError

__all__ = ["ModelSpec", "import_model_class", "load_model", "ignored_weights_message"]

log = logging.getLogger("rnnjac")
_SPEC = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


@dataclass(frozen=True)
class ModelSpec:
    """The user's model an analysis loads a checkpoint into (``model`` None: the recurrent module alone).

    ``model`` is ``"package.module:ClassName"``, ``model_kwargs`` the class's keyword arguments and
    ``submodule`` the dotted name of its recurrent core (None: the only one it holds).
    """

    model: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    submodule: str | None = None


def import_model_class(model: str):
    """The class (or factory) named by ``"package.module:ClassName"``.

    Examples
    --------
    >>> import_model_class("torch.nn:GRU")
    <class 'torch.nn.modules.rnn.GRU'>
    >>> import_model_class("torch.nn.GRU")
    Traceback (most recent call last):
    ...
    ValueError: model must be 'package.module:ClassName' (a module path, a colon, a class name); got 'torch.nn.GRU'
    """
    if not isinstance(model, str) or not _SPEC.fullmatch(model):
        raise ValueError(
            f"model must be 'package.module:ClassName' (a module path, a colon, a class name); got {model!r}"
        )
    module_name, _, attr = model.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any failure of the user's module is theirs to see, in one line
        detail = " ".join(str(err).split()) or type(err).__name__
        raise ImportError(f"model={model!r}: cannot import {module_name} ({type(err).__name__}: {detail})") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportError(f"model={model!r}: {obj.__name__} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"model={model!r} is a {type(obj).__name__}, not a class")
    return obj


def _build(model: str, model_kwargs) -> nn.Module:
    if model_kwargs is None:
        model_kwargs = {}
    if not isinstance(model_kwargs, Mapping) or not all(isinstance(k, str) for k in model_kwargs):
        raise TypeError(f"model_kwargs must be a dict of keyword arguments; got {model_kwargs!r}")
    cls = import_model_class(model)
    try:
        instance = cls(**model_kwargs)
    except Exception as err:  # noqa: BLE001 - the user's constructor: one line that names it
        detail = " ".join(str(err).split()) or type(err).__name__
        raise TypeError(
            f"model={model!r}: building it with model_kwargs={dict(model_kwargs)!r} failed: {detail}"
        ) from err
    if not isinstance(instance, nn.Module):
        raise TypeError(f"model={model!r} built a {type(instance).__name__}, not a torch.nn.Module")
    return instance


def _state_dict(path: Path, unsafe: bool) -> dict:
    obj = _unwrap(*_read(path, unsafe=unsafe, map_location="cpu"))
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or module")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _listed(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")


def _fit(state: dict, wanted: set, path: Path, model: str) -> dict:
    """``state`` with exactly the ``wanted`` keys (a common leading ``"name."`` of the file's keys is dropped when
    that makes them fit, e.g. Lightning's ``"model."``); else ``ValueError`` listing missing and unexpected keys."""
    if set(state) == wanted:
        return state
    heads = {k.split(".", 1)[0] for k in state}
    if len(heads) == 1 and all("." in k for k in state):
        (head,) = heads
        stripped = {k[len(head) + 1 :]: v for k, v in state.items()}
        if set(stripped) == wanted:
            log.info("model=%r: the checkpoint's keys carry the prefix %r; loaded without it", model, head + ".")
            return stripped
    missing, unexpected = wanted - set(state), set(state) - wanted
    parts = [f"missing keys ({len(missing)}): {_listed(missing)}"] if missing else []
    parts += [f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}"] if unexpected else []
    raise ValueError(f"the state dict in {path} does not fit model={model!r} (strict loading): " + "; ".join(parts))


def load_model(path, model: str, model_kwargs=None, *, unsafe: bool = False) -> nn.Module:
    """``model(**model_kwargs)`` with the checkpoint's state dict loaded strictly, in ``eval()`` mode.

    Parameters
    ----------
    path : str or Path
        A checkpoint as for :func:`rnnjac.load_checkpoint` (state dict, wrapped state dict, ``.safetensors``;
        a whole pickled module only with ``unsafe=True``, whose state dict is then used).
    model : str
        ``"package.module:ClassName"``; the module must be importable (on ``sys.path``).
    model_kwargs : dict, optional
        Keyword arguments of the class.
    unsafe : bool
        As for :func:`rnnjac.load_checkpoint`.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
    >>> torch.save({"state_dict": torch.nn.GRU(3, 4).state_dict()}, path)
    >>> load_model(path, "torch.nn:GRU", {"input_size": 3, "hidden_size": 4})
    GRU(3, 4)
    """
    instance = _build(model, model_kwargs)
    path = Path(path)
    state = _fit(_state_dict(path, unsafe), set(instance.state_dict()), path, model)
    try:
        instance.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shapes that do not fit: torch's message spans several lines
        detail = "; ".join(line.strip() for line in str(err).splitlines()[1:] if line.strip()) or str(err)
        raise ValueError(f"the state dict in {path} does not fit model={model!r}: {detail}") from None
    return instance.eval()


def ignored_weights_message(path, load_kwargs: dict | None = None) -> str | None:
    """The warning for a checkpoint analysed without its model: the weights besides the recurrent module's.

    None when the file holds only the recurrent module's weights (or a whole pickled module).

    Examples
    --------
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
    >>> torch.save({"enc.weight": torch.zeros(2, 2), **torch.nn.GRU(2, 3).state_dict()}, path)
    >>> ignored_weights_message(path).split(":")[0]
    "the checkpoint holds weights besides the recurrent module's (enc.weight)"
    """
    kw = dict(load_kwargs or {})
    state, info = _load(
        Path(path),
        arch=None,
        nonlinearity=None,
        prefix=kw.get("prefix"),
        unsafe=kw.get("unsafe", False),
        map_location="cpu",
    )
    return describe_ignored(list(state), info["prefix"])
