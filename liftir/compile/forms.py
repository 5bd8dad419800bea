"""Which of a compiled pass's equivalent graphs runs faster on this machine, found on the
pass's own calls.

A pass on one CPU thread has two forms that give the same bits: the graph as compiled, and
the same graph with its long elementwise chains run chunk by chunk in cache (`tiling`).
Which is faster depends on the CPU's caches more than on the model. Interleaved A/B, one
thread, the same passes (benchmarks/ab.py): tiled against as compiled on a 2-core Intel Xeon
(2 MiB L2 a core) a bidirectional LSTM 0.89x, a GRU 0.89-0.92x, the rest 0.98-1.02x; as
compiled against tiled on a 2-core AMD EPYC (1 MiB L2 a core, 32 MiB L3) the LSTM 0.93x,
the GRU 0.95x, a ViT 0.99x (2026-12-07). No fixed choice is right on both, so each pass
measures.

A pass runs its first form (the graph as compiled: a single call builds nothing more) for
its first `CALLS` calls, the first of them a warm-up (onnxruntime's arena grows, fresh
pages fault in); only a pass called again, as a loop over batches calls it, builds the
second form's session and runs it as many calls; from then on it keeps the form whose
best timed call was faster and drops the other session. The sessions draw on one CPU arena
(liftir/threads.py), so while both live the trial holds a second copy of the pass's
constants, not a second arena of intermediates. Timings decide only
which of two equal results comes back sooner.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: calls each form runs while the pass measures: one warm-up, then timed ones
CALLS = 3
#: calls after which a pass with two forms runs the faster (what benchmarks warm up past)
SETTLED_AFTER = 2 * CALLS


class FormTrial:
    """The sessions of one pass's forms, tried in order on its calls (module docstring).

    `first` is form 0's session, already built; `builders` build the others when their
    turn comes, or return None where the pass has no such form (then it is never tried).
    Row groups call a pass from several threads at once: the state is locked."""

    def __init__(self, first, builders: list[Callable[[], object]] = ()):
        self.sessions = [first] + [None] * len(builders)
        self._builders = [None] + list(builders)
        self._calls = [0] * len(self.sessions)
        self._best = [float("inf")] * len(self.sessions)
        self.chosen: int | None = 0 if not builders else None
        self._lock = threading.Lock()

    @property
    def session(self):
        """The session calls run now: the chosen form's, or the one being measured."""
        return self.sessions[self._turn()]

    def _turn(self) -> int:
        if self.chosen is not None:
            return self.chosen
        return next((i for i, n in enumerate(self._calls) if n < CALLS), len(self._calls) - 1)

    def run(self, call: Callable[[object], object]):
        """call(session) on this call's form, timed while the pass measures."""
        with self._lock:
            form = self._turn()
            while self.sessions[form] is None:
                built = self._builders[form]()
                if built is not None:
                    self.sessions[form] = built
                    break
                self._drop(form)  # no such form: the others are the trial
                form = self._turn()
            timed = self.chosen is None and self._calls[form] > 0  # the form's first call warms up
            self._calls[form] += 1
            session = self.sessions[form]
        start = time.perf_counter()
        out = call(session)
        if timed:
            self._record(form, time.perf_counter() - start)
        return out

    def _drop(self, form: int) -> None:
        """Leave out a form that does not exist (called with the lock held)."""
        for state in (self.sessions, self._builders, self._calls, self._best):
            del state[form]
        if len(self.sessions) == 1:
            self.chosen = 0

    def _record(self, form: int, seconds: float) -> None:
        with self._lock:
            self._best[form] = min(self._best[form], seconds)
            if self.chosen is None and all(n >= CALLS for n in self._calls):
                self.chosen = min(range(len(self._best)), key=self._best.__getitem__)
                self.sessions = [s if i == self.chosen else None for i, s in enumerate(self.sessions)]
