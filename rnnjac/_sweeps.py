"""Sweeps over many checkpoints on Dask, resumable, into one Dataset with a ``checkpoint`` dim.

Each checkpoint is one ``dask.delayed`` task that analyses it (:func:`rnnjac._pipeline.analyze_checkpoint`) and
writes its result atomically (:func:`rnnjac.save`) to ``<out>.parts/<key>.nc``; ``key`` hashes the checkpoint's
path as given, its contents (SHA-256) and the configuration (inputs, options, load keywords). When every task is
done the rows are concatenated along ``checkpoint`` (coordinates: ``checkpoint`` path, ``training_step`` from the
file's metadata or name, ``checkpoint_sha256``), sorted by training step then path, and written atomically to
``out`` (netCDF, or zarr chunked by checkpoint; a zarr folder is swapped, see :mod:`rnnjac._io`). The parts of this
sweep are then deleted, and the parts folder once it is empty.

Rerunning with ``out`` (all decided before any work):

- A row or part is reused only for the same path, the same contents and the same configuration, so a rerun with
  other options never mixes rows. An ``out`` of another configuration is replaced only with ``overwrite=True``
  (``FileExistsError`` otherwise); parts of another configuration stay in the parts folder for their own rerun.
- ``out`` holds exactly the requested checkpoints, one row per path (two files with the same contents are two
  rows). Rows of checkpoints that are no longer listed, or whose file changed, are dropped only with
  ``overwrite=True``; otherwise ``FileExistsError`` names them.
- A rerun with nothing to compute writes nothing: ``out`` keeps its bytes and modification time.
- Ctrl-C after some checkpoints finished raises :class:`rnnjac._io.Interrupted` (a ``KeyboardInterrupt``) whose
  message says how many are kept in the parts folder, that ``out`` is unchanged and that rerunning the same call
  resumes; a plain ``KeyboardInterrupt`` means that nothing was written.
- A checkpoint that fails raises the same exception type with a one-line message that starts with its path,
  also from workers; finished parts are kept.

Scheduling: synchronous by default; ``client=`` (a ``dask.distributed.Client``), ``scheduler=``
(an address) or ``workers=N`` (a ``LocalCluster`` of N single-threaded worker processes, its logs silenced).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import xarray as xr

from ._checkpoints import inspect_checkpoint, sha256
from ._datasets import CHECKPOINT, concat_checkpoints, stack_checkpoints
from ._distributed import compute_distributed
from ._io import Interrupted, check_output, open_dataset, remove_stale_temps, save
from ._pipeline import (
    InputSpec,
    ModelSpec,
    SpectraOptions,
    analyze_checkpoint,
    as_h0,
    as_inputs,
    describe_inputs,
    tensor_digest,
)

__all__ = ["analyze_checkpoints"]

log = logging.getLogger(__name__)

OPTION_FIELDS = frozenset(f.name for f in fields(SpectraOptions))


def _config_key(inputs, options: SpectraOptions, load_kwargs: dict, h0=None, model: ModelSpec | None = None) -> str:
    """The sweep's configuration: inputs (an :class:`InputSpec`'s fields, or a given tensor's shape and SHA-256),
    the options' own JSON (:meth:`SpectraOptions.to_json`), load keywords; a given ``h0`` and ``model`` when set."""
    key = {"inputs": json.loads(describe_inputs(inputs)[1]), "options": json.loads(options.to_json())}
    key["load"] = load_kwargs
    if h0 is not None:
        key["h0_sha256"] = tensor_digest(h0)
    if model is not None:
        key["model"] = asdict(model)
    return json.dumps(key, sort_keys=True, default=str)


def _resolve_options(options, keywords: dict) -> SpectraOptions:
    """The one :class:`SpectraOptions` of a sweep: ``options=`` or the keywords of :func:`rnnjac.spectra`."""
    generator = keywords.pop("generator", None)
    unknown = sorted(set(keywords) - OPTION_FIELDS)
    if unknown:
        raise TypeError(
            f"analyze_checkpoints() got unexpected keyword argument(s) {', '.join(unknown)}; the analysis keywords "
            f"are {', '.join(sorted(OPTION_FIELDS))} and generator"
        )
    if options is not None:
        if not isinstance(options, SpectraOptions):
            raise TypeError(f"options must be a SpectraOptions (or None); got {type(options).__name__}")
        if keywords or generator is not None:
            given = ", ".join(f"{k}=" for k in [*keywords, *(["generator"] if generator is not None else [])])
            raise TypeError(f"pass the analysis either as options= or as keywords, not both; got options= and {given}")
        return options
    if generator is not None:
        if "seed" in keywords:
            raise TypeError("pass either seed= or generator=, not both")
        keywords["seed"] = int(generator.initial_seed())
    return SpectraOptions(**keywords)


def _part_name(path: str, digest: str, config: str) -> str:
    """File name of a checkpoint's part: a hash of its path as given, its contents and the configuration."""
    return hashlib.sha256(json.dumps([path, digest, config]).encode()).hexdigest()[:40] + ".nc"


def _named(err: Exception, path: str) -> Exception:
    """The same exception type with a one-line message that starts with the checkpoint's path."""
    msg = f"checkpoint {path}: " + (" ".join(str(err).split()) or type(err).__name__)
    try:
        named = type(err)(msg)
    except Exception:  # noqa: BLE001 - a type that needs other arguments
        return RuntimeError(msg)
    return named if str(named) == msg else RuntimeError(msg)


def _run_one(path: str, part: str, inputs, options, load_kwargs, command, in_worker: bool, h0=None, model=None):
    """Analyse one checkpoint and write its part atomically (unless it is there); returns the part's path and the
    warnings the analysis raised, as ``(category, message)`` (a worker process cannot show them as the caller
    does: :func:`_compute` raises them again in the caller's process, naming the checkpoint)."""
    import torch

    if in_worker:
        torch.set_num_threads(1)
    if Path(part).exists():
        return part, []
    with warnings.catch_warnings(record=True) as caught:  # the filters in force here decide what is recorded
        try:
            extra = {} if h0 is None and model is None else {"h0": h0, "model": model}
            ds = analyze_checkpoint(path, inputs, options, load_kwargs=load_kwargs, command=command, **extra)
        except Exception as err:
            raise _named(err, path) from err
    save(ds, part)
    return part, [(w.category, str(w.message)) for w in caught]


def _check_compatible(paths, load_kwargs, inputs) -> None:
    """One architecture and size for every checkpoint, and given inputs of their input size (before any work)."""
    shapes = {}
    for p in paths:
        info = inspect_checkpoint(p, prefix=load_kwargs.get("prefix"), unsafe=load_kwargs.get("unsafe", False))
        shapes[p] = tuple(info[k] for k in ("arch", "input_size", "hidden_size", "num_layers", "proj_size"))
    kinds = sorted(set(shapes.values()))
    if len(kinds) > 1:
        groups = {k: [p for p, s in shapes.items() if s == k][:2] for k in kinds}
        raise ValueError(
            "a sweep needs checkpoints of one architecture and size; found "
            + "; ".join(f"{k} in {v}" for k, v in groups.items())
        )
    if not isinstance(inputs, InputSpec) and inputs.shape[-1] != kinds[0][1]:
        raise ValueError(
            f"inputs have {inputs.shape[-1]} features (last dim of shape {tuple(inputs.shape)}); the checkpoints' "
            f"input_size is {kinds[0][1]}"
        )


def analyze_checkpoints(
    paths,
    inputs=None,
    *,
    h0=None,
    out=None,
    overwrite: bool = False,
    options: SpectraOptions | None = None,
    load_kwargs: dict | None = None,
    client=None,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = False,
    command: str = "",
    model: ModelSpec | None = None,
    **spectra_options,
) -> xr.Dataset:
    """Analyse several checkpoints (of one architecture) into one Dataset with a ``checkpoint`` dim.

    Mirrors :func:`rnnjac.spectra`: each checkpoint is loaded (:func:`rnnjac.load_checkpoint`) and analysed on
    the same inputs with the same keywords.

    Parameters
    ----------
    paths : sequence of str or Path
        Checkpoint files.
    inputs : Tensor, array, str, Path or None
        ``(B, T, I)`` inputs (batch first) as a tensor or numpy array, a file (``.npy``, ``.npz``, ``.pt``,
        ``.nc`` holding one such array), or None: 8 Gaussian trials of 200 steps (seed 0). The older
        ``InputSpec`` form is accepted too.
    h0 : Tensor, optional
        The initial state (the module's format, or flat ``(B, D)``); zeros by default.
    out : str or Path, optional
        ``.nc`` or ``.zarr``. With ``out`` the sweep is resumable (see module docstring).
    overwrite : bool
        Replace an existing ``out`` of another configuration, or drop its rows of checkpoints that are not in
        ``paths`` (or whose file changed). An ``out`` of the same configuration is extended without it. Only an
        output that rnnjac wrote is ever replaced.
    options : SpectraOptions, optional
        The whole analysis as one value, instead of the keywords.
    load_kwargs : dict, optional
        Passed to :func:`rnnjac.load_checkpoint` (``prefix``, ``arch``, ``nonlinearity``, ``unsafe``).
    client, scheduler, workers
        Dask execution: an existing ``distributed.Client``, a scheduler address, or a local cluster
        of ``workers`` processes; synchronous when none is given.
    progress : bool
        Dask's progress bar (distributed runs).
    command : str
        Recorded in the output's attrs.
    **spectra_options
        The analysis keywords of :func:`rnnjac.spectra` (``k``, ``warmup``, ``tangent_warmup``, ``reortho_every``,
        ``eigenvalues``, ``end_to_end``, ``local_lyapunov``, ``keep_states``, ``singular_values``, ``lyapunov``,
        ``state``, ``method``, ``dtype``, ``device``, ``time_chunk``, ``seed``, ``generator``), validated together
        before any work, as by ``spectra``.

    Notes
    -----
    Seeds: every checkpoint's initial tangent basis is drawn from a fresh ``torch.Generator().manual_seed(seed)``
    (``seed=0`` by default; ``generator=g`` means ``seed=g.initial_seed()``), so each row equals
    ``rnnjac.spectra(rnnjac.load_checkpoint(p), inputs, generator=torch.Generator().manual_seed(seed), ...)``,
    whatever the order or the worker it ran on. Given tensors are identified by a SHA-256 of their bytes in the
    sweep's configuration (a rerun with other inputs never mixes rows).

    Returns
    -------
    xarray.Dataset
        The spectra variables with a leading ``checkpoint`` dim (one row per path), sorted by ``training_step``.

    Raises
    ------
    FileExistsError
        ``out`` exists with another configuration or other checkpoints, and ``overwrite`` is False.
    rnnjac._io.Interrupted
        Ctrl-C after some checkpoints finished (kept for a rerun); a plain ``KeyboardInterrupt`` if none did.

    Examples
    --------
    >>> x = torch.randn(4, 300, 3)  # doctest: +SKIP
    >>> ds = rnnjac.analyze_checkpoints(sorted(glob.glob("runs/step_*.pt")), x, k=3, out="sweep.zarr")  # doctest: +SKIP
    >>> ds.lyapunov_exponents.sel(le_index=0).plot(x="training_step")  # doctest: +SKIP
    """
    inputs = as_inputs(inputs)
    h0 = as_h0(h0)
    options = _resolve_options(options, spectra_options)
    if model is not None and not isinstance(model, ModelSpec):
        raise TypeError(f"model must be a ModelSpec (or None); got {type(model).__name__}")
    load_kwargs = dict(load_kwargs or {})
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("analyze_checkpoints needs at least one checkpoint path")
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"checkpoint {p} does not exist")
        if not Path(p).is_file():
            raise ValueError(f"checkpoint {p} is not a regular file")
    if len(set(paths)) != len(paths):
        raise ValueError("the same checkpoint path is listed twice")
    if model is None or model.model is None:
        _check_compatible(paths, load_kwargs, inputs)
    config = _config_key(inputs, options, load_kwargs, h0, model)
    digests = {p: sha256(p) for p in paths}
    run = dict(inputs=inputs, options=options, load_kwargs=load_kwargs, command=command, client=client)
    run.update(scheduler=scheduler, workers=workers, progress=progress, h0=h0, model=model)
    if out is None:
        parts = Path(tempfile.mkdtemp(prefix="rnnjac-sweep-"))
        try:
            names = {p: _part_name(p, digests[p], config) for p in paths}
            return _combine([], _compute(paths, parts, names, run), config, command).load()
        finally:
            shutil.rmtree(parts, ignore_errors=True)
    return _sweep_to(Path(out), paths, digests, config, overwrite, run)


def _existing_rows(out: Path, paths, digests, config: str, overwrite: bool):
    """``(old Dataset or None, its rows to keep)``; raises before any work what may not be replaced."""
    check_output(out, overwrite=True, kind="dataset")  # recovers an interrupted swap; refuses a foreign output
    if not os.path.lexists(out):
        return None, []
    old = open_dataset(out)
    if old.attrs.get("sweep_config") != config or CHECKPOINT not in old.dims:
        if not overwrite:
            raise FileExistsError(
                f"{out} exists with another configuration (or is not a sweep); pass overwrite=True to replace it"
            )
        return old, []
    wanted = {(p, digests[p]) for p in paths}
    rows, dropped = [], []
    for i in range(old.sizes[CHECKPOINT]):
        row = old.isel({CHECKPOINT: i})
        ident = (str(row[CHECKPOINT].item()), str(row["checkpoint_sha256"].item()))
        if ident in wanted:
            rows.append(row)
        else:
            dropped.append(ident[0])
    if dropped and not overwrite:
        shown = ", ".join(dropped[:3]) + (f" and {len(dropped) - 3} more" if len(dropped) > 3 else "")
        raise FileExistsError(
            f"{out} holds {len(dropped)} checkpoint(s) that are not in this list or whose file changed ({shown}); "
            "pass overwrite=True to replace it by a sweep of exactly this list"
        )
    return old, rows


def _sweep_to(out: Path, paths, digests, config: str, overwrite: bool, run: dict) -> xr.Dataset:
    old, done_rows = _existing_rows(out, paths, digests, config, overwrite)
    parts = Path(str(out) + ".parts")
    names = {p: _part_name(p, digests[p], config) for p in paths}
    done = {str(r[CHECKPOINT].item()) for r in done_rows}
    if old is not None and len(done) == len(paths) == old.sizes[CHECKPOINT]:
        _drop_parts(parts, names.values())
        log.info("sweep: all %d checkpoints are already in %s; nothing to compute, nothing written", len(paths), out)
        return old
    if os.path.lexists(parts) and (parts.is_symlink() or not parts.is_dir()):
        raise FileExistsError(f"{parts} (the folder of a sweep's parts) exists and is not a folder")
    todo = [p for p in paths if p not in done]
    try:
        parts.mkdir(exist_ok=True)
        remove_stale_temps(parts)
        log.info("sweep: %d checkpoints, %d in %s, %d to compute", len(paths), len(done), out, len(todo))
        result = _combine(done_rows, _compute(todo, parts, names, run), config, run["command"])
        if out.suffix.lower() == ".zarr":
            result = result.chunk({CHECKPOINT: 1})
        save(result, out, overwrite=old is not None)
    except KeyboardInterrupt as err:  # also the program's own subclass (e.g. for SIGTERM), kept when nothing is new
        honest = _interrupted(out, old is not None, parts, [names[p] for p in todo], len(paths), len(done))
        if honest is None:
            raise
        raise honest from err
    _drop_parts(parts, names.values())
    return result.load()


def _combine(done_rows, part_paths, config: str, command: str) -> xr.Dataset:
    rows = [open_dataset(pp) for pp in part_paths]
    rows = [r.isel({CHECKPOINT: 0}) if CHECKPOINT in r.dims else r for r in rows]
    new = [stack_checkpoints(rows)] if rows else []
    return concat_checkpoints(done_rows + new, attrs={"sweep_config": config, "command": command})


def _compute(todo, parts: Path, names: dict, run: dict) -> list[str]:
    import dask

    use_distributed = any(run[k] is not None for k in ("client", "scheduler", "workers"))
    folder = parts.resolve()
    args = (run["inputs"], run["options"], run["load_kwargs"], run["command"], use_distributed, run["h0"], run["model"])
    tasks = [dask.delayed(_run_one, pure=False)(p, str(folder / names[p]), *args) for p in todo]
    if not tasks:
        return []
    if use_distributed:
        results = compute_distributed(tasks, run["client"], run["scheduler"], run["workers"], run["progress"])
    else:
        results = dask.compute(*tasks, scheduler="synchronous")
    for path, (_, caught) in zip(todo, results, strict=True):
        for category, message in caught:
            warnings.warn(f"{Path(path).name}: {message}", category, stacklevel=2)
    return [part for part, _ in results]


def _interrupted(out: Path, existed: bool, parts: Path, todo_names, total: int, done: int) -> Interrupted | None:
    """The honest interrupt: what is kept where; None when nothing new is on disk (the interrupt stays as it is)."""
    kept = sum((parts / n).exists() for n in todo_names)
    if kept == 0:
        _rmdir_if_empty(parts)
        return None
    state = f"{out} is unchanged" if existed else f"{out} was not written"
    where = f"kept in {parts}/" if not done else f"kept ({done} in {out}, {kept} in {parts}/)"
    return Interrupted(
        f"interrupted: {done + kept} of {total} checkpoints are finished and {where}; {state}; "
        "rerun the same command to resume"
    )


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _drop_parts(parts: Path, names) -> None:
    """Delete this sweep's parts; the folder goes once empty (parts of other configurations stay)."""
    if not parts.is_dir() or parts.is_symlink():
        return
    for n in names:
        (parts / n).unlink(missing_ok=True)
    remove_stale_temps(parts)
    _rmdir_if_empty(parts)
    if parts.exists():
        log.info("sweep: kept %d parts of other configurations in %s", len(list(parts.glob("*.nc"))), parts)
