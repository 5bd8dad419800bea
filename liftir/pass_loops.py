"""How one `attribute` call is cut into passes and run, and its multipliers turned into results.

Three loops, one per kind of pass (liftir/methods.py says which a method takes): passes of
whole samples (`_run_samples`: every method but the two below), of (sample, reference)
pairs (`_run_pairs`: DeepLIFT-SHAP) and of points of the integration path (`_run_path`:
integrated gradients). Each sizes its passes under the memory budget (liftir/memory.py),
runs a pass on the compiled engine where it compiles and on the interpreter elsewhere, and
turns the pass's multipliers into attributions and convergence deltas (`_finish`).

`PassLoops` is the part of `Explainer` (liftir/explainer.py) that runs calls; it reads the
Explainer's `method`, `xp`, `plan`, `options`, `input_names`, `attributed`, `_compiled`,
`_feeds`, `_forward`, `_explained_dtype` and its exposure caches, and sets `last_pass`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import revealcancel, scheduler, targets
from .backend import to_host
from .batch_axis import samples_first
from .errors import BatchAxisError, InputError, RuleError
from .memory import PassSize, RowCost, plan_pass
from .methods import Attribution
from .progress import Progress
from .rule import difference

logger = logging.getLogger("liftir")


class PassLoops:
    """The pass loops of `Explainer` (module docstring)."""

    def _passes(self, passes: list, call: Call, size: PassSize, unit: str):
        """Record the chosen pass size (`last_pass`) and yield the passes, counting their work
        on the progress bar: each pass is (start, stop[, start, stop]) ranges whose product is
        its samples (pairs for DeepLIFT-SHAP, sample-steps for integrated gradients)."""
        self.last_pass = replace(size, unit=unit, passes=len(passes))
        work = [int(np.prod([hi - lo for lo, hi in zip(p[::2], p[1::2])])) for p in passes]
        units = {"sample": "sample", "pair": "pair", "point of the path": "step"}
        with Progress(sum(work), f"liftir {self.method.name}", units.get(unit, unit), call.progress) as bar:
            for item, done in zip(passes, work):
                yield item
                bar.update(done)

    def _pass_forward(self, xs, refs, call: Call, k: int, pairs: int = 0,
                      tile_references: bool = True) -> scheduler.Run:
        """The interpreter's forward of one pass, exposing only what the pass reads.

        Which tensors those are is what the compiled engine records for the same pass
        (`compiler.forward_exposure`: the rules' own backward, traced once per pass shapes),
        so both engines give onnxruntime the same forward graph to optimize and agree bit
        for bit; where the pass cannot be traced, every tensor is exposed, as before."""
        feeds = self._feeds(xs, refs)
        n, r = xs[0].shape[0], 0 if refs is None else refs[0].shape[0]
        key = (call.explained, call.wrt, n, r, k, pairs, tile_references,
               tuple((name, v.shape, v.dtype.str) for name, v in feeds.items()))
        if self._expose_all or self.xp is not np:
            exposed = None
        elif key in self._exposures:
            exposed = self._exposures[key]
        else:
            from .compile.compiler import forward_exposure  # noqa: PLC0415 - the tracer, on demand
            split = tuple(self.attributed) if self.method.split else None
            try:
                exposed = forward_exposure(self.plan, feeds, n, r, call.explained, call.wrt, k, self.options,
                                           pairs, tile_references, split)
            except Exception:  # noqa: BLE001 - whatever the trace cannot do: every tensor, as before
                exposed = None  # (an error of the inputs or the model is the forward's to raise below)
            self._exposures[key] = exposed
        return scheduler.forward(self.plan, self.xp, feeds, n, r, (call.explained,), self.method.mode,
                                 self.options, exposed=exposed)

    def _exposing(self, run_passes, *args):
        """`run_passes(*args)`, again with every forward tensor exposed if a rule read one
        its pass's forward left out (scheduler.NotExposed: a rule whose array code reads
        more than its trace does); said once in a log line."""
        try:
            return run_passes(*args)
        except scheduler.NotExposed as exc:
            if self._expose_all:
                raise
            logger.warning("liftir: %s; this Explainer's forwards return every tensor from now on "
                           "(the same results, slower)", exc)
            self._expose_all = True
            return run_passes(*args)

    def _backward(self, run, call: Call, seed: np.ndarray, node_backward=None):
        dtype = run.device(call.explained).dtype
        return scheduler.backward(run, {call.explained: self.xp.asarray(seed.astype(dtype, copy=False))},
                                  call.wrt, (call.explained,), node_backward=node_backward)

    def _run_samples(self, call: Call, xs, refs, cost: RowCost, budget, cap: int):
        """Every method but DeepLIFT-SHAP and integrated gradients: passes of whole samples,
        each forwarded once and propagated back for its targets in chunks.

        Returns multipliers-turned-attributions (K, N, ...) per wrt tensor and deltas (K, N)."""
        n = xs[0].shape[0]
        revealcancel_ = self.method.split
        per_sample_refs = refs is not None and refs[0].shape[0] == n and n > 1
        size = plan_pass(budget, cost, cap, call.k, forward_rows=1 + per_sample_refs + revealcancel_,
                         fixed_rows=refs is not None and not per_sample_refs,
                         multiplier_factor=2 if revealcancel_ else 1, what="sample")
        size = replace(size, rows=_even(n, size.rows), targets=_even(call.k, size.targets))
        blocks = [(s, min(s + size.rows, n)) for s in range(0, n, size.rows)]
        pieces: dict[str, list] = {w: [] for w in call.wrt}
        deltas = []
        compiled = self._compiled if self._compiled is not None and self._compiled.why_not(call) is None else None

        def one_pass(s0, s1, threads=None, engine=compiled):
            return self._sample_pass(call, xs, refs, per_sample_refs, size, engine, s0, s1, threads)

        for s0, s1 in self._passes(blocks, call, size, "sample"):
            groups = compiled.row_groups(s0, s1, 1 if refs is not None else 2) if compiled is not None else [(s0, s1)]
            results = _in_groups(compiled, groups, (s0, s1), one_pass,
                                 lambda g: self._sample_compiles(call, xs, refs, per_sample_refs, size, compiled, g),
                                 ("sample", call.explained, call.wrt, call.k, _input_shapes(xs)))
            for w in call.wrt:
                pieces[w].append(np.concatenate([r[0][w] for r in results], axis=1))
            if results[0][1] is not None:
                deltas.append(np.concatenate([r[1] for r in results], axis=1))
        attrs = [np.concatenate(pieces[w], axis=1) for w in call.wrt]
        return attrs, np.concatenate(deltas, axis=1) if deltas else None

    def _sample_compiles(self, call: Call, xs, refs, per_sample_refs: bool, size: PassSize, compiled,
                         group) -> bool:
        """Whether the pass of row group `group` compiles for the first chunk of targets (traced
        here, before the groups run at once)."""
        s0, s1 = group
        sub_refs = None if refs is None else [r[s0:s1] if per_sample_refs else r for r in refs]
        feeds = self._feeds([x[s0:s1] for x in xs], sub_refs)
        rows_ref = 0 if sub_refs is None else sub_refs[0].shape[0]
        return compiled.get(feeds, s1 - s0, rows_ref, call, min(size.targets, call.k), threads=1) is not None

    def _sample_pass(self, call: Call, xs, refs, per_sample_refs: bool, size: PassSize, compiled, s0: int,
                     s1: int, threads: int | None):
        """One pass of samples s0:s1 for all targets, in chunks of `size.targets`: its
        attributions (K, s1 - s0, ...) per wrt tensor and deltas (K, s1 - s0) (None for methods
        without a reference); `threads`: the intra-op threads of its compiled sessions."""
        n = xs[0].shape[0]
        revealcancel_ = self.method.split
        sub_refs = None if refs is None else [r[s0:s1] if per_sample_refs else r for r in refs]
        sub_x = [x[s0:s1] for x in xs]
        cp = interpreted = None
        if compiled is not None:  # one onnxruntime session per (shapes, targets) does the pass
            feeds = self._feeds(sub_x, sub_refs)
            rows_ref = 0 if sub_refs is None else sub_refs[0].shape[0]
            cp = compiled.get(feeds, s1 - s0, rows_ref, call, min(size.targets, call.k), threads=threads)
        if cp is None:
            interpreted = self._interpreted_pass(sub_x, sub_refs, call, revealcancel_, min(size.targets, call.k))
        block = {w: [] for w in call.wrt}
        block_deltas = []
        for t0 in range(0, call.k, size.targets):
            seed = call.seed(s0, s1, n, slice(t0, t0 + size.targets), self._explained_dtype(call))
            k = seed.shape[0]
            this = compiled.get(feeds, s1 - s0, rows_ref, call, k, threads=threads) if cp is not None else None
            if this is not None:
                grads, values = this(feeds, seed.astype(this.seed_dtype, copy=False))
                spread = values.pop("liftir_spread", None)
                run = compiled.light_run(this, feeds, values)
                require_samples_first(run, call.explained)
            else:
                if interpreted is None:  # this number of targets did not compile: the interpreter
                    interpreted = self._interpreted_pass(sub_x, sub_refs, call, revealcancel_, k)
                run, spread, node_backward = interpreted
                grads = self._backward(run, call, np.concatenate([seed, seed]) if spread is not None
                                       else seed, node_backward)
            sums = 0.0
            for w in call.wrt:
                if spread is not None:
                    a, s = self._finish_split(run, w, grads[w], spread, k)
                else:
                    a, s = self._finish(run, w, grads[w], k, call)
                block[w].append(a)
                sums = sums + s if s is not None else None
            if self.method.uses_reference:
                block_deltas.append(sums - self._explained_difference(seed, run, call.explained))
        return {w: np.concatenate(block[w]) for w in call.wrt}, np.concatenate(block_deltas) if block_deltas else None

    def _interpreted_pass(self, sub_x, sub_refs, call: Call, revealcancel_: bool, k: int):
        """The interpreter's forward of one pass, and for RevealCancel its split forward:
        (run, spread or None, node_backward or None)."""
        run = self._pass_forward(sub_x, sub_refs, call, k)
        require_samples_first(run, call.explained)
        if not revealcancel_:
            return run, None, None
        spread = revealcancel.split_forward(run, self.plan.order_for((call.explained,)), tuple(self.attributed))
        return run, spread, revealcancel.node_backward(spread)

    def _run_pairs(self, call: Call, xs, refs, cost: RowCost, budget, cap: int):
        """DeepLIFT-SHAP: DeepLIFT for every (sample, reference) pair, averaged over references.

        A pass takes whole samples with all their references when they fit, else one sample
        with a chunk of its references; the per-pair results of a sample are averaged once
        all its pairs are in, so the chunking never changes the numbers."""
        n = xs[0].shape[0]
        own = refs[0].ndim == xs[0].ndim + 1  # (n, B, ...): each sample's own references
        pairs = refs[0].shape[1] if own else refs[0].shape[0]
        # per pair: its reference row, the actual and reference rows expanded into pairs for the
        # rules, a share of the actual row; 0.3 more for transient copies (peak RSS measured on
        # benchmarks/bench_memory.py grew by 3.25 forward rows per pair, plus ~27 MiB once)
        size = plan_pass(budget, cost, cap * pairs, call.k, forward_rows=3.3 + 1 / pairs, what="pair")
        if size.rows >= pairs:
            samples, chunk = _even(n, size.rows // pairs), pairs
        else:
            samples, chunk = 1, _even(pairs, size.rows)
        size = replace(size, rows=min(n, samples) * chunk, targets=_even(call.k, size.targets))
        passes = [(s0, min(s0 + samples, n), b0, min(b0 + chunk, pairs))
                  for s0 in range(0, n, samples) for b0 in range(0, pairs, chunk)]
        pieces: dict[str, list] = {w: [] for w in call.wrt}
        deltas, block, block_deltas = [], {w: [] for w in call.wrt}, []
        compiled = self._compiled if self._compiled is not None and self._compiled.why_not(call) is None else None

        def one_pass(s0, s1, b0, b1, threads=None, engine=compiled):
            return self._pair_pass(call, xs, refs, own, size, engine, (s0, s1, b0, b1), threads)

        for s0, s1, b0, b1 in self._passes(passes, call, size, "pair"):
            # row groups of whole samples, or of one sample's references
            if s1 - s0 > 1:
                groups = [(a, b, b0, b1) for a, b in compiled.row_groups(s0, s1)] if compiled else []
            else:
                groups = [(s0, s1, a, b) for a, b in compiled.row_groups(b0, b1)] if compiled else []
            results = _in_groups(compiled, groups, (s0, s1, b0, b1), one_pass,
                                 lambda g: self._pair_compiles(call, xs, refs, own, size, compiled, g),
                                 ("pair", call.explained, call.wrt, call.k, own, _input_shapes(xs)))
            for w in call.wrt:
                block[w].append(np.concatenate([r[0][w] for r in results], axis=1))
            block_deltas.append(np.concatenate([r[1] for r in results], axis=1))
            if b1 == pairs:  # every pair of samples s0:s1 is in: average over their references
                for w in call.wrt:
                    a = np.concatenate(block[w], axis=1)
                    a = a.reshape((a.shape[0], s1 - s0, pairs) + a.shape[2:])
                    pieces[w].append(a if call.per_pair else a.mean(axis=2))
                d = np.concatenate(block_deltas, axis=1).reshape(-1, s1 - s0, pairs)
                deltas.append(d if call.per_pair else d.mean(axis=2))
                block, block_deltas = {w: [] for w in call.wrt}, []
        attrs = [np.concatenate(pieces[w], axis=1) for w in call.wrt]
        return attrs, np.concatenate(deltas, axis=1)

    def _pair_inputs(self, xs, refs, own: bool, s0: int, s1: int, b0: int, b1: int):
        """Samples s0:s1 and references b0:b1 (each sample's own, or the shared ones)."""
        if own:
            sub_refs = [r[s0:s1, b0:b1].reshape((-1,) + r.shape[2:]) for r in refs]
        else:
            sub_refs = [r[b0:b1] for r in refs]
        return [x[s0:s1] for x in xs], sub_refs

    def _pair_compiles(self, call: Call, xs, refs, own: bool, size: PassSize, compiled, span) -> bool:
        """Whether the pass of the pairs of `span` compiles for the first chunk of targets."""
        s0, s1, b0, b1 = span
        sub_x, sub_refs = self._pair_inputs(xs, refs, own, s0, s1, b0, b1)
        return compiled.get(self._feeds(sub_x, sub_refs), s1 - s0, sub_refs[0].shape[0], call,
                            min(size.targets, call.k), pairs=b1 - b0, tile_references=not own,
                            threads=1) is not None

    def _pair_pass(self, call: Call, xs, refs, own: bool, size: PassSize, compiled, span, threads):
        """DeepLIFT of the (sample, reference) pairs of span = (s0, s1, b0, b1), sample-major,
        for all targets: (K, pairs, ...) per wrt tensor and (K, pairs) deltas (or the explained
        differences, for per-pair results)."""
        s0, s1, b0, b1 = span
        n = xs[0].shape[0]
        sub_x, sub_refs = self._pair_inputs(xs, refs, own, s0, s1, b0, b1)
        interpreted = None
        feeds = self._feeds(sub_x, sub_refs) if compiled is not None else None
        per_target = {w: [] for w in call.wrt}
        pass_deltas = []
        for t0 in range(0, call.k, size.targets):
            seed = call.seed(s0, s1, n, slice(t0, t0 + size.targets), self._explained_dtype(call))
            seed = np.repeat(seed, b1 - b0, axis=1)  # sample-major pairs
            this = None if compiled is None else compiled.get(
                feeds, s1 - s0, sub_refs[0].shape[0], call, seed.shape[0], pairs=b1 - b0, tile_references=not own,
                threads=threads)
            if this is not None:  # one onnxruntime session: the forward, the pairs, their backward
                grads, values = this(feeds, seed.astype(this.seed_dtype, copy=False))
                run = compiled.light_run(this, feeds, values)
                require_samples_first(run, call.explained)
            else:
                if interpreted is None:  # this number of targets did not compile: the interpreter
                    forward = self._pass_forward(sub_x, sub_refs, call, seed.shape[0], pairs=b1 - b0,
                                                 tile_references=not own)
                    interpreted = scheduler.PairedRun(forward, b1 - b0, tile_references=not own)
                    require_samples_first(interpreted, call.explained)
                run = interpreted
                grads = self._backward(run, call, seed)
            sums = 0.0
            for w in call.wrt:
                a, s = self._finish(run, w, grads[w], seed.shape[0], call)
                per_target[w].append(a)
                sums = sums + s
            difference = self._explained_difference(seed, run, call.explained)
            pass_deltas.append(difference if call.per_pair else sums - difference)
        return {w: np.concatenate(per_target[w]) for w in call.wrt}, np.concatenate(pass_deltas)

    def _run_path(self, call: Call, xs, refs, cost: RowCost, budget, cap: int, quadrature):
        """Integrated gradients: gradients at x0 + alpha (x - x0), weighted, times x - x0.

        Passes take (point, sample) rows; the weighted gradients are summed point by point
        in the quadrature's order, so how points are grouped into passes never changes them."""
        alphas, weights, max_rows = quadrature
        n = xs[0].shape[0]
        steps = len(alphas)
        per_sample_refs = refs[0].shape[0] == n and n > 1
        size = plan_pass(budget, cost, cap * steps, call.k, what="point of the path")
        rows = min(size.rows, max_rows or size.rows)
        if rows >= steps:
            samples, points = _even(n, min(cap, rows // steps)), steps
        else:
            samples = _even(n, min(cap, rows))
            points = _even(steps, max(1, rows // samples))
        size = replace(size, rows=samples * points, targets=_even(call.k, size.targets))
        passes = [(s0, min(s0 + samples, n), p0, min(p0 + points, steps))
                  for s0 in range(0, n, samples) for p0 in range(0, steps, points)]
        pieces: dict[str, list] = {w: [] for w in call.wrt}
        deltas = []
        averaged = None
        compiled = self._compiled if self._compiled is not None and self._compiled.why_not(call) is None else None

        def gradients(s0, s1, p0, p1, threads=None, engine=compiled):
            return self._path_gradients(call, xs, refs, per_sample_refs, alphas, size, engine, (s0, s1, p0, p1),
                                        threads)

        for s0, s1, p0, p1 in self._passes(passes, call, size, "point of the path"):
            sub_x = [x[s0:s1] for x in xs]
            sub_refs = [r[s0:s1] if per_sample_refs else r for r in refs]
            if p0 == 0:  # weighted sums of gradients, (K, s, ...) per input
                averaged = [np.zeros((call.k,) + x.shape, dtype=np.float64) for x in sub_x]
            # row groups of whole samples (all the pass's points), or of one sample's points
            if s1 - s0 > 1:
                least = 1 if p1 - p0 > 1 else 2  # rows of the pass: points x samples, two at least
                groups, axis = [(a, b, p0, p1) for a, b in compiled.row_groups(s0, s1, least)] if compiled else [], 2
            else:
                groups, axis = [(s0, s1, a, b) for a, b in compiled.row_groups(p0, p1, 2)] if compiled else [], 1
            results = _in_groups(compiled, groups, (s0, s1, p0, p1), gradients,
                                 lambda g: self._path_compiles(call, xs, refs, per_sample_refs, alphas, size,
                                                               compiled, g),
                                 ("path", call.explained, call.wrt, call.k, _input_shapes(xs)))
            w = weights[p0:p1]
            for c, (t0, k) in enumerate(results[0][0]):
                for i, name in enumerate(self.input_names):
                    if results[0][1][c][i] is None:
                        continue
                    g = np.concatenate([r[1][c][i] for r in results], axis=axis)  # (k, points, samples, ...)
                    for j in range(p1 - p0):  # point by point: the same sums however points are grouped
                        averaged[i][t0:t0 + k] += w[j] * g[:, j].astype(np.float64)
            if p1 < steps:
                continue
            ends = self._forward(sub_x, sub_refs, call.explained)  # f(x) and f(x0) for the residual
            sums = 0.0
            for i, (x, r) in enumerate(zip(sub_x, sub_refs)):
                if self.input_names[i] not in call.wrt:  # an integer input, held at its actual value
                    continue
                contribution = averaged[i] * (x - r).astype(np.float64)[None]
                sums = sums + contribution.reshape(call.k, s1 - s0, -1).sum(axis=2)
                pieces[self.input_names[i]].append(
                    (contribution if call.multiply else averaged[i]).astype(x.dtype))
            differences = []
            for t0 in range(0, call.k, size.targets):
                seed = call.seed(s0, s1, n, slice(t0, t0 + size.targets), ends.device(call.explained).dtype)
                differences.append(self._explained_difference(seed, ends, call.explained))
            deltas.append(sums - np.concatenate(differences))
        attrs = [np.concatenate(pieces[w], axis=1) for w in call.wrt]
        return attrs, np.concatenate(deltas, axis=1)

    def _path_points(self, xs, refs, per_sample_refs: bool, alphas, span):
        """The path's points of `span` = (s0, s1, p0, p1): (points * samples, ...) per input,
        alpha-major, and the samples' inputs."""
        s0, s1, p0, p1 = span
        sub_x = [x[s0:s1] for x in xs]
        sub_refs = [r[s0:s1] if per_sample_refs else r for r in refs]
        a = alphas[p0:p1]
        return [(r[None] + a.reshape((-1,) + (1,) * x.ndim) * (x - r)[None]).reshape((-1,) + x.shape[1:])
                .astype(x.dtype) for x, r in zip(sub_x, sub_refs)], sub_x

    def _path_compiles(self, call: Call, xs, refs, per_sample_refs: bool, alphas, size: PassSize, compiled,
                       span) -> bool:
        """Whether the gradient pass of `span` compiles for the first chunk of targets."""
        path, _ = self._path_points(xs, refs, per_sample_refs, alphas, span)
        return compiled.get(self._feeds(path, None), path[0].shape[0], 0, call, min(size.targets, call.k),
                            threads=1) is not None

    def _path_gradients(self, call: Call, xs, refs, per_sample_refs: bool, alphas, size: PassSize, compiled,
                        span, threads):
        """Gradients at the path's points of span = (s0, s1, p0, p1), per chunk of targets:
        ([(t0, k)], [[(k, points, samples, ...) or None per input] per chunk])."""
        s0, s1, p0, p1 = span
        n = xs[0].shape[0]
        path, sub_x = self._path_points(xs, refs, per_sample_refs, alphas, span)
        run = None
        feeds = self._feeds(path, None) if compiled is not None else None
        chunks, gradients = [], []
        for t0 in range(0, call.k, size.targets):
            seed = call.seed(s0, s1, n, slice(t0, t0 + size.targets), self._explained_dtype(call))
            k = seed.shape[0]
            seed = np.tile(seed, (1, p1 - p0) + (1,) * (seed.ndim - 2))
            this = None if compiled is None else compiled.get(feeds, path[0].shape[0], 0, call, k, threads=threads)
            if this is not None:  # one onnxruntime session does the gradient pass
                grads, _ = this(feeds, seed.astype(this.seed_dtype, copy=False))
            else:
                if run is None:
                    run = self._pass_forward(path, None, call, k)
                    require_samples_first(run, call.explained)
                grads = self._backward(run, call, seed)
            chunks.append((t0, k))
            gradients.append([None if name not in call.wrt or grads[name] is None else
                              to_host(grads[name]).reshape((k, p1 - p0, s1 - s0) + sub_x[i].shape[1:])
                              for i, name in enumerate(self.input_names)])
        return chunks, gradients

    @staticmethod
    def _per_target(attributions, delta, target):
        """(K, N, ...) results as (N, K, ...) and deltas (K, N) as (N, K) for several
        targets; (N, ...) and (N,) for one."""
        k = attributions[0].shape[0] if attributions else delta.shape[0]  # nothing to attribute to: a held path
        delta = None if delta is None else delta.T
        if targets.several(k, target):
            return [np.moveaxis(a, 0, 1) for a in attributions], delta
        return [a[0] for a in attributions], None if delta is None else delta[:, 0]

    def _finish(self, run, tensor: str, m, k: int, call: Call):
        """Multipliers (k, P, ...) of `tensor` turned into what the call returns, on the host,
        with the samples first (a layer whose batch the exporter moved: each sample's own slice),
        and for reference methods the sums of m * (x - x0) per (target, row): (k, P) float64."""
        dtype = run.device(tensor).dtype
        reference = self.method.attribution is Attribution.DELTA
        if m is None:
            m = self.xp.zeros((k,) + run.actual_shape(tensor), dtype=dtype)
        if not reference:
            if self.method.attribution is Attribution.INPUT and call.multiply:
                m = m * run.actual(tensor)
            return to_host(self._samples_first(run, tensor, m)).astype(dtype, copy=False), None
        step = difference(self.xp, run.actual(tensor), run.reference(tensor))
        with np.errstate(invalid="ignore"):  # 0 * inf: handled below
            contribution = self._samples_first(run, tensor, m * step)
        sums = _row_sums(to_host(contribution), k, run.n_actual)
        if not np.isfinite(sums).all():  # an infinite step (a -inf mask computed from ids), or worse
            contribution = self._samples_first(run, tensor, _infinite_steps(self.xp, tensor, m, step))
            sums = _row_sums(to_host(contribution), k, run.n_actual)
        if call.func is not None:
            result = call.func(m, run.actual(tensor), run.reference(tensor))
            if tuple(getattr(result, "shape", ())) != tuple(m.shape):
                raise InputError(f"attribution_func returned shape {tuple(getattr(result, 'shape', ()))} for "
                                 f"{tensor!r}; it must keep the multipliers' shape {tuple(m.shape)}")
            result = self._samples_first(run, tensor, result)
        else:
            result = contribution if call.multiply else self._samples_first(run, tensor, m)
        return to_host(result).astype(dtype, copy=False), sums

    def _samples_first(self, run, tensor: str, a):
        """(k, ...) per-row values of `tensor` with its samples moved to axis 1 (after k)."""
        return samples_first(self.xp, a, run.loc(tensor), lead=1) if tensor in run.values else a

    def _finish_split(self, run, tensor: str, m, spread, k: int):
        """RevealCancel: m+ d+ + m- d- with d+- = (d +- D) / 2, and its sums per (target, row)."""
        if m is None:
            value = run.device(tensor)
            return np.zeros((k, run.n_actual) + tuple(value.shape[1:]), dtype=value.dtype), np.zeros((k, run.n_actual))
        delta = difference(self.xp, run.actual(tensor), run.reference(tensor))
        pos, neg = (delta + spread[tensor]) * 0.5, (delta - spread[tensor]) * 0.5
        a = to_host(self._samples_first(run, tensor, m[:k] * pos + m[k:] * neg)).astype(run.device(tensor).dtype,
                                                                                          copy=False)
        return a, _row_sums(a, k, run.n_actual)

    @staticmethod
    def _explained_difference(seed: np.ndarray, run, tensor: str) -> np.ndarray:
        """f(x)_t - f(x0)_t for each target and row of the seed: sum over output neurons of
        seed * (value - reference value), (k, rows), in double (buffered: no double copy of the seed)."""
        k, rows = seed.shape[:2]
        difference = to_host(run.actual(tensor)).astype(np.float64) - to_host(run.reference(tensor)).astype(np.float64)
        difference = np.broadcast_to(difference, seed.shape[1:]).reshape(rows, -1)
        return np.einsum("krx,rx->kr", seed.reshape(k, rows, -1), difference, dtype=np.float64)


def _infinite_steps(xp, tensor: str, m, step):
    """m * (x - x0) where x - x0 is infinite somewhere (a tensor computed from integer inputs,
    -inf in one pass only: a mask that differs between the input and its reference): nothing
    downstream read the change where m = 0 (the contribution is 0, not 0 * inf = NaN); where
    m != 0 no finite attribution exists, which is refused by name."""
    jump = xp.broadcast_to(abs(step) == np.inf, m.shape)
    if bool((jump & (m != 0)).any()):
        raise RuleError(f"tensor {tensor!r} changes by an infinite amount between the input and its reference "
                        f"(e.g. a -inf mask computed from integer inputs that differ) where the explained output "
                        f"depends on it: no finite attribution carries that change; give the reference the "
                        f"input's own values for those integer inputs")
    with np.errstate(invalid="ignore"):
        return xp.where(jump, xp.zeros((), dtype=m.dtype), m * step)


@dataclass(frozen=True)
class Call:
    """What one `attribute` call explains, shared by the pass loops."""

    explained: str
    stripped: str | None
    axis: int
    target: Any
    rest: tuple[int, ...]  # the explained tensor's non-batch shape
    k: int  # targets explained
    wrt: tuple[str, ...]
    multiply: bool
    func: Callable | None
    progress: bool
    per_pair: bool = False  # DeepLIFT-SHAP: keep each (sample, reference) pair, do not average

    def seed(self, s0: int, s1: int, n: int, chosen: slice, dtype) -> np.ndarray:
        """The initial multipliers of samples s0:s1 (of n) for the targets `chosen` of the K."""
        return targets.seed((s1 - s0,) + self.rest, targets.rows_of(self.target, s0, s1, n), self.stripped,
                            self.axis, chosen, dtype)


def _row_sums(contributions: np.ndarray, k: int, rows: int) -> np.ndarray:
    """Each (target, row)'s sum of contributions (k, rows, ...), accumulated in float64 without
    a float64 copy of them."""
    return contributions.reshape(k, rows, -1).sum(axis=2, dtype=np.float64)


def _input_shapes(xs) -> tuple:
    """The inputs' per-sample shapes and dtypes: with a pass's sizes they fix its shapes."""
    return tuple((x.shape[1:], x.dtype.str) for x in xs)


def _in_groups(compiled, groups: list[tuple], span: tuple, work, compiles, kind: tuple) -> list:
    """[work(*span)] for a pass that runs whole, or [work(*group, 1) for each group], at once
    (liftir/compile/engine.py `row_groups`), when there are several, the first group's pass
    compiles (`compiles(group)`, traced before they start; asked once per pass key) and the
    pass (`kind`: the call and its inputs' shapes, and the span's sizes) has not proved too
    small to split; where it does not compile (said once),
    the interpreter runs the whole pass, whose NumPy work splits over threads on its own."""
    key = kind + tuple(b - a for a, b in zip(span[::2], span[1::2]))
    if len(groups) <= 1 or key in compiled.runs_whole:
        return [work(*span)]
    if key in compiled.groups_compile or compiles(groups[0]):
        compiled.groups_compile.add(key)
        return compiled.run_groups(work, groups, key)
    return [work(*span, None, None)]


def _even(total: int, most: int) -> int:
    """The chunk size that cuts `total` into as few chunks of at most `most` as possible,
    all of about the same size (20 in chunks of 19 becomes 10 + 10, not 19 + 1)."""
    chunks = -(-total // max(1, most))
    return -(-total // chunks)


def require_samples_first(run, tensor: str) -> None:
    """Targets index an explained tensor (N, ...): its samples must be on axis 0, alone."""
    loc = run.loc(tensor)
    if tensor in run.values and not (loc.axis == 0 and loc.plain):
        raise BatchAxisError(f"the explained tensor {tensor!r} (shape {tuple(run.device(tensor).shape)}) holds "
                             f"the samples on axis {loc.axis}" + ("" if loc.plain else " merged with other axes")
                             + "; explain a tensor with the samples on axis 0 (output=...)")
