"""The compiled engine inside `Explainer.attribute`: compiled passes cached per shapes, with
the interpreter as the fallback for whatever does not compile (said once in a log line).
"""
from __future__ import annotations

import logging

from .. import scheduler
from ..backend import to_host
from ..methods import Engine
from . import device
from .compiler import CompiledPass, compile_pass
from .tracer import TraceError

logger = logging.getLogger("liftir")

ENGINES = tuple(e.value for e in Engine)


class CompiledEngine:
    """Compiled passes of one Explainer, keyed by (explained, wrt, feed shapes, rows, targets)."""

    def __init__(self, explainer):
        self.explainer = explainer
        self.passes: dict[tuple, CompiledPass | None] = {}
        self.reasons: dict[tuple, str] = {}

    def why_not(self, call) -> str | None:
        """Why a call cannot use the compiled engine at all, or None."""
        if call.func is not None:
            return "attribution_func is array code applied after the pass"
        return device.why_not_on(self.explainer.xp)

    def get(self, feeds: dict, n: int, r: int, call, k: int, pairs: int = 0,
            tile_references: bool = True) -> CompiledPass | None:
        key = (call.explained, call.wrt, n, r, k, pairs, tile_references,
               tuple((name, v.shape, v.dtype.str) for name, v in feeds.items()))
        if key not in self.passes:
            ex = self.explainer
            split = tuple(ex.attributed) if ex.method.split else None
            compiled = None
            try:
                host = {name: to_host(v) for name, v in feeds.items()}  # tracing probes on NumPy
                compiled = compile_pass(ex.plan, host, n, r, call.explained, call.wrt, k, ex.options,
                                        pairs, tile_references, split)
                self.passes[key] = compiled.start(ex.xp)
            except (TraceError, NotImplementedError) as exc:
                self._fallback(key, str(exc))
            except Exception as exc:  # noqa: BLE001 - a rule's code or onnxruntime refusing: interpreter
                what = "onnxruntime cannot run the compiled graph" if compiled is not None else "tracing failed"
                self._fallback(key, f"{what} ({type(exc).__name__}: "
                                    f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''})")
        return self.passes[key]

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
