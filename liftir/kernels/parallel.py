"""Elementwise work split over CPU threads.

NumPy's ufuncs run on one core but release the GIL, so on the largest activations a
rule's elementwise work (a ReLU's Rescale multiplier, say) runs about 1.7x faster in
row chunks on a small thread pool. Only for NumPy and arrays big enough to pay for it;
CuPy work is already parallel on the GPU.

The chunks are also kept small (about `BLOCK_ELEMENTS` elements, whole rows): a rule's
several passes over one chunk (a ReLU multiplier makes seven) then stay in the core's
cache instead of streaming every activation through memory once per pass. On DeepLIFT-
SHAP's 40 pairs of a BPNet layer (64 x 2114 per row) the ReLU multiplier took 2.6x less
CPU in one-row chunks than in one piece (benchmarks/README.md, genome pipeline).
"""
from __future__ import annotations

import numpy as np

from ..threads import cpu_threads, thread_pool

MIN_ELEMENTS = 1 << 18  # below this, one thread is as fast
BLOCK_ELEMENTS = 1 << 17  # a chunk's share of a 1-2 MiB L2 cache, for float32 arrays


def _threads() -> int:
    return max(1, min(8, cpu_threads()))


def over_rows(xp, work, rows: int, size: int) -> None:
    """Call work(row_slice) for slices covering range(rows), in parallel when worth it.

    `size` is the elements the work touches (rows times the elements per row); slices are
    whole rows, at most about BLOCK_ELEMENTS elements each (one row when rows are larger).
    """
    threads = _threads()
    if xp is not np or threads == 1 or size < MIN_ELEMENTS or rows < 2:
        work(slice(0, rows))
        return
    per_row = max(1, size // rows)
    step = max(1, min(-(-rows // threads), BLOCK_ELEMENTS // per_row))
    chunks = [slice(a, min(a + step, rows)) for a in range(0, rows, step)]
    list(thread_pool("elementwise", threads).map(work, chunks))
