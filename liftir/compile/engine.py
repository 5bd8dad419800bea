"""The compiled engine inside `Explainer.attribute`: compiled passes cached per shapes, with
the interpreter as the fallback for whatever does not compile (said once in a log line).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import numpy as np

from .. import scheduler
from ..backend import to_host
from ..methods import Engine
from ..threads import cpu_threads, thread_pool
from . import device
from .compiler import CompiledPass, compile_pass
from .tracer import TraceError

logger = logging.getLogger("liftir")

ENGINES = tuple(e.value for e in Engine)

#: row groups that ran in less than this (seconds, all of them at once) run whole from then
#: on: dispatching them and each group's own Python work (its feeds, seeds, attributions)
#: cost ~0.5 ms a pass, which a second core does not win back on a pass of a few ms (a
#: 64-row MLP, 2 cores: DeepLIFT 1.08 ms in two groups against 0.61 whole, DeepLIFT-SHAP
#: 2.02 against 1.43, integrated gradients 2.82 against 2.58; a BatchNorm ResNet's 7 ms
#: pass 0.91x in groups)
SMALL_S = 0.003


class CompiledEngine:
    """Compiled passes of one Explainer, keyed by (explained, wrt, feed shapes, rows, targets)."""

    def __init__(self, explainer):
        self.explainer = explainer
        self.passes: dict[tuple, CompiledPass | None] = {}
        self.reasons: dict[tuple, str] = {}
        self._compiling = threading.Lock()  # row groups of one pass ask for the same shapes at once
        #: passes whose row groups ran faster than SMALL_S (`run_groups`): they run whole now
        self.runs_whole: set[tuple] = set()
        #: passes whose first row group compiled: the check need not build its feeds again
        self.groups_compile: set[tuple] = set()

    def why_not(self, call) -> str | None:
        """Why a call cannot use the compiled engine at all, or None."""
        if call.func is not None:
            return "attribution_func is array code applied after the pass"
        return device.why_not_on(self.explainer.xp)

    def row_groups(self, s0: int, s1: int, least: int = 1) -> list[tuple[int, int]]:
        """How the compiled pass of rows s0:s1 runs on the CPU: split into one group of rows
        per thread, run at once on one-thread sessions (`run_groups`), or whole. A group
        takes at least `least` rows: a pass needs two forward rows to tell the batch axis
        from other axes of size 1 (liftir/batch_axis.py), so without reference rows, two.

        Why: a compiled pass is hundreds of nodes, many small (reductions to one flag, shape
        arithmetic, a recurrent net's per-step products), which onnxruntime's intra-op
        threads cannot share, and its elementwise kernels split well only when large. Two
        halves of the batch on one thread each keep both cores busy through all of it:
        measured on 2 cores, a ViT's pass 35.5 ms against 49.1 on one two-thread session,
        a bidirectional LSTM's 69.5 against 84.1 (one thread: 71 and 116). Samples are
        independent in every method, so the groups' results are the pass's; the groups hold
        together the rows the memory budget planned for the pass."""
        groups = min(cpu_threads(), (s1 - s0) // least) if self.explainer.xp is np else 1
        if groups <= 1:
            return [(s0, s1)]
        base, extra = divmod(s1 - s0, groups)  # sizes differ by one at most, none below `least`
        bounds = np.cumsum([s0] + [base + (g < extra) for g in range(groups)])
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def run_groups(self, work, groups: list[tuple[int, ...]], key: tuple) -> list:
        """[work(*group, threads) for each group of rows], the groups at once when there are
        several (each on one thread: `threads` is the intra-op threads its sessions take).
        `key` names the pass: if its groups took less than SMALL_S, it runs whole from now on."""
        if len(groups) == 1:
            return [work(*groups[0], None)]
        start = time.perf_counter()
        # a pool of its own: a group's interpreter fallback may use liftir/kernels/parallel.py's,
        # which must not wait on itself
        results = list(thread_pool("row-groups", len(groups)).map(lambda group: work(*group, 1), groups))
        if time.perf_counter() - start < SMALL_S:
            self.runs_whole.add(key)
        return results

    def get(self, feeds: dict, n: int, r: int, call, k: int, pairs: int = 0,
            tile_references: bool = True, threads: int | None = None) -> CompiledPass | None:
        """The compiled pass for these shapes (traced on first use; None: the interpreter runs
        it), its session on `threads` intra-op threads (None: `cpu_threads()`)."""
        shapes = (call.explained, call.wrt, n, r, k, pairs, tile_references,
                  tuple((name, v.shape, v.dtype.str) for name, v in feeds.items()))
        key = shapes + (threads,)
        if key not in self.passes:
            with self._compiling:
                if key not in self.passes:
                    self._compile(key, shapes, feeds, n, r, call, k, pairs, tile_references, threads)
        return self.passes[key]

    def _compile(self, key, shapes, feeds, n, r, call, k, pairs, tile_references, threads) -> None:
        """Trace the pass once per shapes; each thread count gets its own session of it."""
        ex = self.explainer
        same = next((p for other, p in self.passes.items() if other[:-1] == shapes), False)
        if same is None:  # did not compile: said once already
            self.passes[key] = None
            return
        compiled = None
        try:
            if same:
                compiled = replace(same, trial=None, runner=None)
            else:
                split = tuple(ex.attributed) if ex.method.split else None
                host = {name: to_host(v) for name, v in feeds.items()}  # tracing probes on NumPy
                compiled = compile_pass(ex.plan, host, n, r, call.explained, call.wrt, k, ex.options,
                                        pairs, tile_references, split)
            self.passes[key] = compiled.start(ex.xp, threads)
        except (TraceError, NotImplementedError) as exc:
            self._fallback(key, str(exc))
        except Exception as exc:  # noqa: BLE001 - a rule's code or onnxruntime refusing: interpreter
            what = "onnxruntime cannot run the compiled graph" if compiled is not None else "tracing failed"
            self._fallback(key, f"{what} ({type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''})")

    def _fallback(self, key, reason: str) -> None:
        self.passes[key] = None
        self.reasons[key] = reason
        logger.warning("liftir: the compiled engine cannot compile this pass: %s; the interpreter runs it "
                       "instead (same results, slower)", reason)

    def light_run(self, compiled: CompiledPass, feeds: dict, values: dict) -> scheduler.Run:
        """A Run holding only what the attributions read (inputs, explained tensor, layer)."""
        ex = self.explainer
        run = scheduler.Run(ex.plan, ex.xp, compiled.n_actual, compiled.n_ref, ex.method.mode, ex.options)
        run.values.update(feeds)
        run.values.update(values)
        run.batch = compiled.batch
        if compiled.pairs:
            return scheduler.PairedRun(run, compiled.pairs, tile_references=compiled.tile_references)
        return run
