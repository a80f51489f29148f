"""Running a sweep's tasks on dask.distributed: a given client, a scheduler address, or a local cluster."""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager

__all__ = ["compute_distributed"]


@contextmanager
def _quiet_distributed():
    """Silence distributed's loggers in this process while the cluster we started runs."""
    loggers = [logging.getLogger(n) for n in ("distributed", "tornado", "bokeh")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def compute_distributed(tasks, client, scheduler, workers, progress):
    from dask.distributed import Client

    if client is not None:
        return _gather(client, tasks, progress)
    if scheduler is not None:
        with Client(scheduler) as own_client:
            return _gather(own_client, tasks, progress)
    import dask
    from dask.distributed import LocalCluster

    # the workers' scratch space in a folder of ours, removed afterwards (dask's default is a shared
    # dask-scratch-space in the system's temporary folder, left behind)
    with (
        _quiet_distributed(),
        tempfile.TemporaryDirectory(prefix="rnnjac-dask-") as scratch,
        dask.config.set({"temporary-directory": scratch}),
    ):
        cluster = LocalCluster(
            n_workers=int(workers or 1),
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,
            local_directory=scratch,
        )
        try:
            with Client(cluster) as own_client:
                return _gather(own_client, tasks, progress)
        finally:
            cluster.close()


def _gather(client, tasks, progress):
    futures = client.compute(tasks)
    if progress:
        from dask.distributed import progress as dask_progress

        dask_progress(futures)
    return client.gather(futures)
