"""Running the pipeline's tasks on Dask: a LocalCluster started here, or any cluster.

Nothing here schedules: Dask places the tasks, reruns those of a worker that dies, and
this module only submits them and reports each one that finishes. Workers write their
chunks to the store themselves, so the store path (like the model and the FASTA) must
be on a filesystem every worker sees.
"""
from __future__ import annotations

import uuid
from typing import Callable

from ..errors import InputError
from ..threads import ENV, cpu_threads


def _distributed():
    try:
        import distributed
    except ImportError:
        raise InputError("workers / scheduler need dask.distributed: pip install 'liftir[genome]'") from None
    return distributed


def local_cluster(distributed, workers: int):
    """`workers` processes on this machine, one task at a time each, sharing its cores.

    Processes, so that a worker that crashes or is killed takes only its own task with it;
    one task per worker, since a task's arrays already use threads: each worker gets its
    share of the cores (LIFTIR_NUM_THREADS, and the BLAS/OpenMP equivalents), so that
    workers do not oversubscribe them (2 workers on 2 cores ran slower than 1 process)."""
    share = str(max(1, cpu_threads() // workers))
    env = {ENV: share, "OMP_NUM_THREADS": share, "OPENBLAS_NUM_THREADS": share, "MKL_NUM_THREADS": share}
    return distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                    dashboard_address=None, silence_logs=40, env=env)


def run_on_dask(job, tasks: list, workers: int, scheduler: str | None,
                task_done: Callable[[list[int]], None]) -> None:
    """Run `tasks` ((regions, chunk ids) pairs) as `run_task(job, regions, chunks)` on Dask."""
    distributed = _distributed()
    from .pipeline import run_task
    cluster = None
    if scheduler:
        try:
            client = distributed.Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise InputError(f"cannot reach the Dask scheduler at {scheduler!r}: {exc}") from None
    else:
        cluster = local_cluster(distributed, workers)
        client = distributed.Client(cluster)
    try:
        shared = client.scatter(job, broadcast=True)
        run_id = uuid.uuid4().hex[:8]
        futures = [client.submit(run_task, shared, regions, chunks, pure=False,
                                 key=f"liftir-genome-{run_id}-{chunks[0]}")
                   for regions, chunks in tasks]
        for future in distributed.as_completed(futures):
            task_done(future.result())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
