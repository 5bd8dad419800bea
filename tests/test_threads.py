"""liftir's thread count (liftir/threads.py): LIFTIR_NUM_THREADS, else the process's cores
(its affinity: what Slurm or taskset gave it), and local Dask workers sharing the cores."""
from __future__ import annotations

import os
import select

import numpy as np
import pytest

import liftir
from liftir.threads import ENV, cpu_threads
from onnx_builders import op_model


def test_the_environment_caps_threads_and_sessions_use_it(monkeypatch):
    monkeypatch.setenv(ENV, "3")
    assert cpu_threads() == 3
    ex = liftir.Explainer(op_model("Relu", [(2, 4)]))
    x = np.ones((2, 4), np.float32)
    ex.attribute(x, target=0)
    sessions = list(ex.plan._ort_forward.values())
    assert sessions and all(s.session.get_session_options().intra_op_num_threads == 3 for s in sessions)


def test_without_the_variable_it_is_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert cpu_threads() == expected


@pytest.mark.parametrize("bad", ["0", "-2", "four"])
def test_a_bad_value_is_refused_by_name(monkeypatch, bad):
    monkeypatch.setenv(ENV, bad)
    with pytest.raises(liftir.InputError, match=ENV):
        cpu_threads()


def _worker_threads():
    return os.environ.get(ENV), os.environ.get("OMP_NUM_THREADS"), cpu_threads()


def test_local_dask_workers_share_the_cores(monkeypatch):
    distributed = pytest.importorskip("distributed")
    from liftir.genome.dask_driver import local_cluster
    monkeypatch.setenv(ENV, "4")  # as if this machine had 4 cores: 2 workers get 2 each
    with local_cluster(distributed, 2) as cluster, distributed.Client(cluster) as client:
        seen = client.run(_worker_threads)
    assert sorted(seen.values()) == [("2", "2", 2), ("2", "2", 2)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_thread_pools_of_its_own():
    """A pool's threads do not survive fork (multiprocessing's default on Linux): the child
    of a process that used liftir's pools runs work on new ones instead of waiting forever."""
    from liftir.threads import thread_pool
    pool = thread_pool("test-fork", 2)
    assert list(pool.map(lambda v: v * 2, [1, 2])) == [2, 4]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's pool would never run this
        try:
            ok = thread_pool("test-fork", 2) is not pool and thread_pool("test-fork", 2).submit(
                lambda: 42).result(timeout=10) == 42
        except Exception:  # noqa: BLE001 - anything is a failure, reported through the pipe
            ok = False
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 60)  # a child stuck anywhere fails, never hangs
    got = os.read(read, 1) if ready else b""
    if not got:
        os.kill(pid, 9)
    os.waitpid(pid, 0)
    os.close(read)
    assert got == b"1"
    assert thread_pool("test-fork", 2) is pool  # the parent keeps its own
