"""Sweeps over many checkpoints on Dask, resumable, into one Dataset with a ``checkpoint`` dim.

Each checkpoint is one ``dask.delayed`` task that analyses it (:func:`rnnjac.pipeline.analyze_checkpoint`)
and writes its result atomically to ``<out>.parts/<sha256>.nc``. When every task is done the parts
are concatenated along ``checkpoint`` (coordinates: ``checkpoint`` path, ``training_step`` from the
file's metadata or name, ``checkpoint_sha256``) and written atomically to ``out`` (netCDF, or zarr
chunked by checkpoint); the parts folder is then removed. A rerun skips checkpoints whose part (or
whose row in an existing output of the same configuration) is already there, so an interrupted sweep
resumes without recomputing anything finished, and a killed task leaves no half-written part.

Scheduling: synchronous by default; ``client=`` (a ``dask.distributed.Client``), ``scheduler=``
(an address) or ``workers=N`` (a ``LocalCluster`` of N single-threaded worker processes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import xarray as xr

from .checkpoints import inspect_checkpoint, sha256
from .datasets import CHECKPOINT, check_writable, concat_checkpoints, open_dataset, save, stack_checkpoints
from .pipeline import InputSpec, SpectraOptions, analyze_checkpoint

__all__ = ["analyze_checkpoints"]

log = logging.getLogger(__name__)


def _config_key(inputs: InputSpec, options: SpectraOptions, load_kwargs: dict) -> str:
    return json.dumps(
        {"inputs": asdict(inputs), "options": asdict(options), "load": load_kwargs}, sort_keys=True, default=str
    )


def _run_one(path: str, digest: str, parts: str, inputs, options, load_kwargs, command, in_worker: bool) -> str:
    """Analyse one checkpoint and write its part atomically; returns the part's path."""
    import torch

    if in_worker:
        torch.set_num_threads(1)
    target = Path(parts) / f"{digest}.nc"
    if target.exists():
        return str(target)
    ds = analyze_checkpoint(path, inputs, options, load_kwargs=load_kwargs, command=command)
    fd, tmp = tempfile.mkstemp(prefix=".part.", suffix=".tmp", dir=parts)
    os.close(fd)
    try:
        ds.to_netcdf(tmp, engine="h5netcdf")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(target)


def _check_compatible(paths, load_kwargs) -> None:
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


def analyze_checkpoints(
    paths,
    *,
    inputs: InputSpec | None = None,
    options: SpectraOptions | None = None,
    out=None,
    overwrite: bool = False,
    load_kwargs: dict | None = None,
    client=None,
    scheduler: str | None = None,
    workers: int | None = None,
    command: str = "",
    progress: bool = False,
) -> xr.Dataset:
    """Analyse several checkpoints (of one architecture) into one Dataset with a ``checkpoint`` dim.

    Parameters
    ----------
    paths : sequence of str or Path
        Checkpoint files.
    inputs, options : InputSpec, SpectraOptions
        What to feed each model and what to compute (defaults: 8 Gaussian trials of 200 steps;
        singular values and all Lyapunov exponents).
    out : str or Path, optional
        ``.nc`` or ``.zarr``. With ``out`` the sweep is resumable (see module docstring).
    overwrite : bool
        Replace an existing output of a *different* configuration (one of the same configuration
        is extended/resumed without it).
    load_kwargs : dict, optional
        Passed to :func:`rnnjac.load_checkpoint` (``prefix``, ``arch``, ``nonlinearity``, ``unsafe``).
    client, scheduler, workers
        Dask execution: an existing ``distributed.Client``, a scheduler address, or a local cluster
        of ``workers`` processes; synchronous when none is given.

    Returns
    -------
    xarray.Dataset
        The spectra variables with a leading ``checkpoint`` dim, sorted by ``training_step``.

    Examples
    --------
    >>> ds = rnnjac.analyze_checkpoints(sorted(glob.glob("runs/step_*.pt")), out="sweep.zarr")  # doctest: +SKIP
    >>> ds.lyapunov_exponents.sel(le_index=0).plot(x="training_step")  # doctest: +SKIP
    """
    import dask

    inputs = inputs or InputSpec()
    options = options or SpectraOptions()
    load_kwargs = dict(load_kwargs or {})
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("analyze_checkpoints needs at least one checkpoint path")
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"checkpoint {p} does not exist")
    if len(set(paths)) != len(paths):
        raise ValueError("the same checkpoint path is listed twice")
    _check_compatible(paths, load_kwargs)
    key = _config_key(inputs, options, load_kwargs)
    digests = {p: sha256(p) for p in paths}
    done_rows: list[xr.Dataset] = []
    tmp_parts = None
    if out is not None:
        out = Path(out)
        if out.exists():
            old = open_dataset(out)
            if old.attrs.get("sweep_config") != key and not overwrite:
                raise FileExistsError(f"{out} exists with another configuration; pass overwrite=True (--overwrite)")
            if old.attrs.get("sweep_config") == key:
                for i in range(old.sizes.get(CHECKPOINT, 0)):
                    row = old.isel({CHECKPOINT: i})
                    if row["checkpoint_sha256"].item() in set(digests.values()):
                        done_rows.append(row)
        else:
            check_writable(out)
        parts = Path(str(out) + ".parts")
    else:
        tmp_parts = tempfile.mkdtemp(prefix="rnnjac-sweep-")
        parts = Path(tmp_parts)
    parts.mkdir(exist_ok=True)
    done_sha = {r["checkpoint_sha256"].item() for r in done_rows}
    todo = [p for p in paths if digests[p] not in done_sha]
    already = [p for p in todo if (parts / f"{digests[p]}.nc").exists()]
    log.info(
        "sweep: %d checkpoints, %d in the output, %d parts on disk, %d to compute",
        len(paths),
        len(done_sha),
        len(already),
        len(todo) - len(already),
    )
    use_distributed = client is not None or scheduler is not None or workers is not None
    tasks = [
        dask.delayed(_run_one, pure=False)(
            p, digests[p], str(parts), inputs, options, load_kwargs, command, use_distributed
        )
        for p in todo
    ]
    try:
        if use_distributed:
            part_paths = _compute_distributed(tasks, client, scheduler, workers, progress)
        else:
            part_paths = list(dask.compute(*tasks, scheduler="synchronous"))
        rows = [open_dataset(pp) for pp in part_paths]
        rows = [r.isel({CHECKPOINT: 0}) if CHECKPOINT in r.dims else r for r in rows]
        result = concat_checkpoints(
            done_rows + ([stack_checkpoints(rows)] if rows else []), attrs={"sweep_config": key, "command": command}
        )
        if out is not None:
            if out.suffix == ".zarr":
                result = result.chunk({CHECKPOINT: 1})
            save(result, out, overwrite=True)
            shutil.rmtree(parts, ignore_errors=True)
        return result.load()
    finally:
        if tmp_parts is not None:
            shutil.rmtree(tmp_parts, ignore_errors=True)


def _compute_distributed(tasks, client, scheduler, workers, progress):
    from dask.distributed import Client, LocalCluster

    own_cluster = own_client = None
    try:
        if client is None:
            if scheduler is not None:
                client = own_client = Client(scheduler)
            else:
                own_cluster = LocalCluster(
                    n_workers=int(workers or 1),
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    silence_logs=logging.WARNING,
                )
                client = own_client = Client(own_cluster)
        futures = client.compute(tasks)
        if progress:
            from dask.distributed import progress as dask_progress

            dask_progress(futures)
        return client.gather(futures)
    finally:
        if own_client is not None:
            own_client.close()
        if own_cluster is not None:
            own_cluster.close()
