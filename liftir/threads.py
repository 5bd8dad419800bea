"""How many CPU threads liftir's own work may use.

Every onnxruntime session and the elementwise thread pool ask here instead of
`os.cpu_count()`, which counts every core of the machine: a Slurm job or a `taskset`
gets a few of them (the process's affinity says which), and Dask workers sharing one
machine must share its cores (`liftir.genome` gives each `LIFTIR_NUM_THREADS`).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

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


def session_options(shared_arena: bool = False):
    """onnxruntime SessionOptions for liftir's sessions: `cpu_threads()` intra-op threads
    that spin while a run lasts and stop the moment it returns.

    Spinning keeps a pass of hundreds of small nodes from paying a thread wake-up per node
    (compiled DeepLIFT passes 10-20% faster on 2 cores than with spinning off); stopping at
    the end of each run leaves the cores to NumPy's pool and to other Dask workers between
    runs, which onnxruntime's default (spin on after the run) would not.

    `shared_arena`: CPU memory from one arena of the process (`_shared_cpu_arena`), not the
    session's own, where onnxruntime can.
    """
    import onnxruntime as ort  # noqa: PLC0415 - only where a session is made

    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if shared_arena and _shared_cpu_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    return options


_ARENA: list[bool] = []


def _shared_cpu_arena() -> bool:
    """Register one CPU arena with onnxruntime's environment (once per process), for liftir's
    CPU sessions to share: each session keeps its own arena at its peak otherwise, so an
    Explainer holding passes of several shapes (compiled), or the full and the exposing
    forward of the interpreter (liftir/scheduler.py), held the sum of their peaks."""
    if not _ARENA:
        import onnxruntime as ort  # noqa: PLC0415
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
            _ARENA.append(True)
        except Exception:  # noqa: BLE001 - an onnxruntime without it: per-session arenas
            _ARENA.append(False)
    return _ARENA[0]


_POOLS: dict[str, tuple[int, int, ThreadPoolExecutor]] = {}  # name -> (pid, workers, pool)


def thread_pool(name: str, workers: int) -> ThreadPoolExecutor:
    """This process's pool `name` of at least `workers` threads. Made again in a forked child
    (multiprocessing's default on Linux): a pool's threads do not survive fork, and work
    submitted to the parent's pool would wait forever. An outgrown pool is dropped, not shut
    down (a caller may still hold it); its idle threads end once it is collected."""
    pid = os.getpid()
    held = _POOLS.get(name)
    if held is None or held[0] != pid or held[1] < workers:
        held = (pid, workers, ThreadPoolExecutor(workers, thread_name_prefix=f"liftir-{name}"))
        _POOLS[name] = held
    return held[2]
