"""A compiled pass's forms (liftir/compile/forms.py): each tried on the pass's own calls, the
faster kept. The clock is the test's, so nothing here depends on this machine's speed."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from liftir.compile import forms


class _Session:
    """A stand-in session that says which form ran and takes `cost` on the test's clock."""

    def __init__(self, name, cost, clock):
        self.name, self.cost, self.clock = name, cost, clock

    def run(self):
        self.clock.now += self.cost
        return self.name


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(forms.time, "perf_counter", c)
    return c


@pytest.mark.parametrize("first_cost, second_cost, kept", [(2.0, 1.0, "tiled"), (1.0, 2.0, "compiled")])
def test_the_faster_form_is_kept_after_each_ran_its_calls(clock, first_cost, second_cost, kept):
    built = []
    first = _Session("compiled", first_cost, clock)

    def build():
        built.append(1)
        return _Session("tiled", second_cost, clock)

    trial = forms.FormTrial(first, [build])
    ran = [trial.run(lambda s: s.run()) for _ in range(2 * forms.CALLS)]
    assert ran == ["compiled"] * forms.CALLS + ["tiled"] * forms.CALLS
    assert trial.chosen == (0 if kept == "compiled" else 1)
    assert [trial.run(lambda s: s.run()) for _ in range(3)] == [kept] * 3
    assert built == [1]  # built once, when its turn came
    assert sum(s is not None for s in trial.sessions) == 1  # the slower session is dropped


def test_a_pass_called_once_builds_no_second_form(clock):
    built = []
    trial = forms.FormTrial(_Session("compiled", 1.0, clock), [lambda: built.append(1)])
    assert trial.run(lambda s: s.run()) == "compiled"
    assert built == [] and trial.chosen is None


def test_warm_up_calls_are_not_timed(clock):
    """Each form's first call (arena growth, page faults) does not count: a form slow only
    on its first call still wins."""
    costs = iter([100.0, 1.0, 1.0])

    class Warming(_Session):
        def run(self):
            self.clock.now += next(costs)
            return self.name

    trial = forms.FormTrial(_Session("compiled", 2.0, clock), [lambda: Warming("tiled", 0, clock)])
    for _ in range(2 * forms.CALLS):
        trial.run(lambda s: s.run())
    assert trial.chosen == 1


def test_a_form_the_pass_does_not_have_is_never_tried(clock):
    """A builder that finds no such form (no chain pays for tiling) returns None: the pass
    keeps its first form from that call on, with no calls spent measuring a copy of it."""
    asked = []
    trial = forms.FormTrial(_Session("compiled", 1.0, clock), [lambda: asked.append(1)])
    ran = [trial.run(lambda s: s.run()) for _ in range(forms.CALLS + 2)]
    assert ran == ["compiled"] * (forms.CALLS + 2)
    assert asked == [1] and trial.chosen == 0 and len(trial.sessions) == 1


def test_a_single_form_runs_without_measuring(clock):
    trial = forms.FormTrial(_Session("compiled", 1.0, clock))
    assert trial.chosen == 0 and trial.run(lambda s: s.run()) == "compiled"


def test_calls_from_several_threads_count_once_each(clock):
    """Row groups call one pass from several threads at once: every call is counted, each
    form's session is built once, and a form is chosen."""
    built = []
    lock = threading.Lock()

    def build():
        with lock:
            built.append(1)
        return _Session("tiled", 1.0, clock)

    trial = forms.FormTrial(_Session("compiled", 1.0, clock), [build])
    threads = [threading.Thread(target=lambda: [trial.run(lambda s: s.run()) for _ in range(5)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert built == [1] and trial.chosen in (0, 1)
    assert np.sum([s is not None for s in trial.sessions]) == 1


def test_a_tiled_form_that_does_not_build_leaves_the_pass_as_compiled(monkeypatch, caplog):
    """The second form is built mid-loop, inside a call: if that fails, the call and the ones
    after it run the graph as compiled, with the same results, and a log line says why."""
    import liftir
    from liftir.compile.compiler import CompiledPass

    monkeypatch.setenv("LIFTIR_NUM_THREADS", "1")

    def broken(self, xp=np, threads=1):
        raise RuntimeError("no tiled form today")

    monkeypatch.setattr(CompiledPass, "tiled_form", broken)
    x = np.load(liftir.__path__[0] + "/data/digits.npy")[:4].astype(np.float32)
    ex = liftir.Explainer("example:digits", engine="compiled")
    with caplog.at_level("WARNING", logger="liftir"):
        results = [ex.attribute(x, target=3) for _ in range(forms.SETTLED_AFTER + 1)]
    for r in results[1:]:
        assert np.array_equal(r, results[0])
    assert "did not build" in caplog.text
    passes = [p for p in ex._compiled.passes.values() if p is not None]
    assert passes and all(p.trial.chosen is not None for p in passes)
