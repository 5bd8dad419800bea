"""How many CPU threads liftir's own work may use.

Every onnxruntime session and the elementwise thread pool ask here instead of
`os.cpu_count()`, which counts every core of the machine: a Slurm job or a `taskset`
gets a few of them (the process's affinity says which), and Dask workers sharing one
machine must share its cores (`liftir.genome` gives each `LIFTIR_NUM_THREADS`).
"""
from __future__ import annotations

import os

#: the environment variable that caps liftir's threads (a positive int)
ENV = "LIFTIR_NUM_THREADS"


def cpu_threads() -> int:
    """LIFTIR_NUM_THREADS if set, else the cores this process may run on."""
    value = os.environ.get(ENV, "").strip()
    if value:
        try:
            count = int(value)
        except ValueError:
            count = 0
        if count < 1:
            from .errors import InputError
            raise InputError(f"{ENV} must be a positive integer, got {value!r}")
        return count
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform (macOS, Windows)
        return os.cpu_count() or 1
