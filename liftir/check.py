"""Conservation checking: the heart of `liftir check`.

DeepLIFT's summation-to-delta must hold at every node, not only at the output: for a
node with outputs y and inputs x, sum(m_y * (y - y0)) == sum(m_x * (x - x0)) for any
multipliers m_y arriving from above. A rule that breaks it is wrong whatever the model,
so checking each node with *random* output multipliers (which exercise every output
neuron, unlike one target class) pinpoints the faulty rule by name. The check also
compares liftir's forward with onnxruntime's, since attributions of a wrongly computed
forward are meaningless.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .batch_axis import samples_first
from .backend import to_host
from .data import resolve_model
from .errors import InputError
from .explainer import Explainer
from .graph import FLOAT_DTYPES, read_model
from .rule import difference
from .threads import cpu_threads

__all__ = ["check_model", "compare_with_onnxruntime", "generate_inputs", "CheckReport",
           "NodeCheck", "SummationCheck", "ForwardCheck", "ORT_DOMAINS"]

#: operator domains onnxruntime implements; a node in another domain cannot run there
ORT_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training",
                         "com.microsoft", "com.microsoft.nchwc"})
_TINY = 1e-30


def _difference(actual, reference):
    """actual - reference in float64 on the host; 0 where equal (a mask's -inf in both passes)."""
    return difference(np, to_host(actual).astype(np.float64), to_host(reference).astype(np.float64))


@dataclass
class NodeCheck:
    """Local summation-to-delta of one node, worst over samples (and targets)."""

    name: str
    op_type: str
    domain: str
    residual: float = 0.0  # sum(m_y dy) - sum(m_x dx) of the worst sample (signed)
    relative: float = 0.0  # |residual| / (sum|m_y dy| or sum|m_x dx|, the larger)
    scale: float = 0.0
    sample: int = 0
    rtol: float = 1e-4
    error: str | None = None  # the observer could not evaluate the node (bad rule output)

    @property
    def qualified_op(self) -> str:
        return f"{self.domain}::{self.op_type}" if self.domain else self.op_type

    @property
    def passed(self) -> bool:
        return self.error is None and self.relative <= self.rtol

    def _update(self, residual: np.ndarray, scale: np.ndarray, offset: int) -> None:
        relative = np.abs(residual) / (scale + _TINY)
        k, p = np.unravel_index(int(np.argmax(relative)), relative.shape)
        if relative[k, p] > self.relative or (self.scale == 0 and scale[k, p] > 0):
            self.relative = float(relative[k, p])
            self.residual = float(residual[k, p])
            self.scale = float(scale[k, p])
            self.sample = offset + int(p)


@dataclass
class SummationCheck:
    """Summation-to-delta of the whole model, per sample."""

    residual: np.ndarray  # (N,) sum of input contributions - sum of m_out * dy_out
    relative: np.ndarray  # (N,)
    rtol: float = 1e-4

    @property
    def passed(self) -> bool:
        return bool(np.all(self.relative <= self.rtol))

    def worst(self, count: int = 3) -> list[int]:
        return [int(i) for i in np.argsort(-self.relative, kind="stable")[:count]]


@dataclass
class ForwardCheck:
    """liftir's forward versus onnxruntime on the same inputs."""

    status: str  # "ok", "mismatch" or "skipped"
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst_output: str | None = None
    note: str = ""
    rtol: float = 1e-4
    atol: float = 1e-5

    @property
    def passed(self) -> bool:
        return self.status != "mismatch"

    def __str__(self) -> str:
        if self.status == "skipped":
            return f"skipped: {self.note}"
        text = (f"{self.status} (max abs err {self.max_abs:.2e}, max rel err {self.max_rel:.2e}; "
                f"rtol {self.rtol:g}, atol {self.atol:g})")
        if self.status == "mismatch":
            text += f" worst at output {self.worst_output!r}"
        return text


@dataclass
class CheckReport:
    """Everything `liftir check` found; `ok` is False if any part failed."""

    model: str
    nodes: list[NodeCheck]
    summation: SummationCheck
    forward: ForwardCheck
    samples: int
    rtol: float
    max_rule: str
    explained: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failed_nodes(self) -> list[NodeCheck]:
        return [n for n in self.nodes if not n.passed]

    @property
    def ok(self) -> bool:
        return not self.failed_nodes and self.summation.passed and self.forward.passed

    @property
    def failures(self) -> list[str]:
        """One readable line per failure; every failing node is named with its op type."""
        lines = []
        for n in self.failed_nodes:
            if n.error:
                lines.append(f"node {n.name!r} ({n.qualified_op}): could not be checked: {n.error}")
            else:
                lines.append(f"node {n.name!r} ({n.qualified_op}) loses conservation: residual "
                             f"{n.residual:.3e}, relative {n.relative:.3e} > rtol {n.rtol:g} "
                             f"(sample {n.sample})")
        if not self.summation.passed:
            worst = self.summation.worst()
            lines.append("summation-to-delta fails at the output: worst samples " + ", ".join(
                f"{i} (residual {self.summation.residual[i]:.3e}, relative "
                f"{self.summation.relative[i]:.3e})" for i in worst
                if self.summation.relative[i] > self.rtol))
        if not self.forward.passed:
            lines.append(f"liftir's forward differs from onnxruntime's: {self.forward}")
        return lines

    def __str__(self) -> str:
        head = (f"liftir check: {self.model}  (deeplift, max_rule={self.max_rule}, "
                f"{self.samples} sample(s), rtol {self.rtol:g})")
        lines = [head, f"explained: {', '.join(self.explained)} (random output multipliers)"]
        lines.append(f"forward vs onnxruntime: {self.forward}")
        s = self.summation
        worst = s.worst(1)[0] if s.relative.size else 0
        status = "ok" if s.passed else "FAIL"
        if s.relative.size:
            lines.append(f"summation-to-delta at the output: {status} (worst relative residual "
                         f"{s.relative[worst]:.2e} at sample {worst}, residual {s.residual[worst]:.2e})")
        failing = self.failed_nodes
        lines.append(f"per-node conservation: {len(self.nodes)} node(s) checked, {len(failing)} failing")
        shown = self.nodes
        if len(shown) > 40:
            worst_ok = sorted((n for n in self.nodes if n.passed), key=lambda n: -n.relative)[:15]
            keep = {id(n) for n in failing + worst_ok}
            shown = [n for n in self.nodes if id(n) in keep]
        if shown:
            wn = max(4, min(48, max(len(n.name) for n in shown)))
            wo = max(2, max(len(n.qualified_op) for n in shown))
            lines.append(f"  {'node':<{wn}}  {'op':<{wo}}  {'residual':>10}  {'relative':>9}  status")
            for n in shown:
                name = n.name if len(n.name) <= wn else "..." + n.name[-(wn - 3):]
                state = "ok" if n.passed else ("ERROR" if n.error else "FAIL")
                lines.append(f"  {name:<{wn}}  {n.qualified_op:<{wo}}  {n.residual:>10.2e}  "
                             f"{n.relative:>9.2e}  {state}")
            if len(shown) < len(self.nodes):
                lines.append(f"  ... {len(self.nodes) - len(shown)} more node(s) pass "
                             f"(showing failures and the 15 worst)")
        lines.extend(f"note: {note}" for note in self.notes)
        if self.ok:
            lines.append("OK: every node conserves the difference-from-reference")
        else:
            lines.append(f"FAILED ({len(self.failures)}):")
            lines.extend(f"  - {f}" for f in self.failures)
        return "\n".join(lines)


# ---- inputs -------------------------------------------------------------------------------

def generate_inputs(explainer: Explainer, samples: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal inputs of the declared shapes; a symbolic batch axis gets `samples`.

    A fixed batch axis b keeps b rows per run; `samples` is rounded up to a multiple of b.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for info in explainer.inputs:
        if info.shape is None:
            raise InputError(f"input {info.name!r} has no declared shape; pass inputs "
                             f"(liftir check MODEL --input x.npy)")
        shape = []
        for axis, dim in enumerate(info.shape):
            if isinstance(dim, int) and dim > 0:
                shape.append(dim * (-(-samples // dim)) if axis == 0 else dim)
            elif axis == 0:
                shape.append(samples)
            else:
                raise InputError(f"input {info.name!r} has an unknown size {dim!r} at axis {axis} "
                                 f"(declared shape {info.shape}); pass inputs of the right shape "
                                 f"(liftir check MODEL --input x.npy)")
        out[info.name] = rng.standard_normal(shape).astype(info.dtype)
    return out


def _fixed_batch(explainer: Explainer, n: int) -> int:
    """Rows per run: the declared batch size if fixed (and it divides n), else all n."""
    sizes = {i.shape[0] for i in explainer.inputs if i.shape and isinstance(i.shape[0], int)
             and i.shape[0] > 0}
    if len(sizes) == 1:
        b = sizes.pop()
        if b < n and n % b == 0:
            return b
    return n


# ---- onnxruntime --------------------------------------------------------------------------

def custom_domains(model) -> list[str]:
    """Operator domains of `model` that onnxruntime cannot run (no local function for them)."""
    local = {f.domain for f in model.functions}
    return sorted({n.domain for n in model.graph.node} - ORT_DOMAINS - local)


def _ort_session(source, model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_threads()
    options.log_severity_level = 3
    # the loaded proto holds any external data liftir read (from the model's folder only), so
    # onnxruntime never opens files itself; a path only past protobuf's 2 GiB limit
    if model.ByteSize() >= 2**31 and isinstance(source, (str, os.PathLike)):
        return ort.InferenceSession(os.fspath(resolve_model(source)), options,
                                    providers=["CPUExecutionProvider"])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _compare(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], rtol: float,
             atol: float) -> ForwardCheck:
    max_abs = max_rel = 0.0
    worst = None
    ok = True
    for name, ref in theirs.items():
        if name not in ours:
            continue
        a = np.asarray(ours[name], dtype=np.float64)
        b = np.asarray(ref, dtype=np.float64)
        if a.shape != b.shape:
            return ForwardCheck("mismatch", np.inf, np.inf, name,
                                f"output {name!r}: liftir shape {a.shape}, onnxruntime {b.shape}", rtol, atol)
        err = np.abs(a - b)
        if err.size:
            rel = float((err / (np.abs(b) + _TINY)).max())
            if float(err.max()) > max_abs:
                max_abs, worst = float(err.max()), name
            max_rel = max(max_rel, rel)
            if not np.all(err <= atol + rtol * np.abs(b)):
                ok = False
                worst = name
    return ForwardCheck("ok" if ok else "mismatch", max_abs, max_rel, worst, "", rtol, atol)


def compare_with_onnxruntime(model, inputs, rtol: float = 1e-4, atol: float = 1e-5) -> ForwardCheck:
    """Run `model` in liftir (Explainer.predict) and onnxruntime on `inputs`, compare all outputs."""
    proto = read_model(model)
    domains = custom_domains(proto)
    if domains:
        return ForwardCheck("skipped", note=f"onnxruntime cannot run ops of custom domain(s) "
                                            f"{', '.join(map(repr, domains))}", rtol=rtol, atol=atol)
    outs = [o.name for o in proto.graph.output]
    ex = Explainer(proto, method="saliency", output=outs[0])
    batch = ex.prepare_inputs(inputs, None, need_reference=False)
    ours = _rules_forward(ex, batch, tuple(outs))
    theirs = dict(zip(outs, _ort_session(model, proto).run(outs, dict(zip(ex.input_names, batch.inputs)))))
    return _compare(ours, theirs, rtol, atol)


# ---- the check --------------------------------------------------------------------------

def _float_outputs(ex: Explainer) -> list[str]:
    names = []
    for info in ex.graph.outputs:
        if info.name in ex.graph.constants:
            continue
        if info.dtype is not None and info.dtype.type not in FLOAT_DTYPES:
            continue
        names.append(info.name)
    return names


def _samples_first(run, name: str, term: np.ndarray) -> np.ndarray:
    """A (K, ...) host array of tensor `name` with its samples on axis 1 (the batch may be
    anywhere in the tensor: liftir/batch_axis.py)."""
    return samples_first(np, term, run.loc(name), lead=1) if name in run.values else term


def _rows(a, k: int, p: int) -> np.ndarray:
    """Per-(target, sample) sums of a (K, P, ...) array."""
    return a.reshape(k, p, -1).sum(axis=-1)


def check_model(model: Any, inputs=None, baselines=None, samples: int = 8, rtol: float = 1e-4,
                seed: int = 0, max_rule: str = "cross_max", *, output: str | None = None,
                final_activation: str = "keep", rules=None, backend: str = "numpy",
                forward_rtol: float = 1e-4, forward_atol: float = 1e-5,
                precision: str = "model") -> CheckReport:
    """Check DeepLIFT's summation-to-delta at every node, and the forward against onnxruntime.

    Inputs default to standard normal of the declared shapes (a symbolic batch axis gets
    `samples` rows), baselines to zeros. Every float model output (or `output`) is
    seeded with standard-normal multipliers. `final_activation="keep"` (default) also
    checks a final Softmax/Sigmoid rule; "strip" checks what `Explainer` explains.
    `precision="float64"` checks the graph run in double precision, as `Explainer` runs it.
    """
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise InputError(f"samples must be a positive int, got {samples!r}")
    if not rtol > 0:
        raise InputError(f"rtol must be positive, got {rtol!r}")
    proto = read_model(model)
    label = os.fspath(model) if isinstance(model, (str, os.PathLike)) else (proto.graph.name or "<model>")
    graph_outputs = [o.name for o in proto.graph.output]
    ex = Explainer(proto, method="deeplift", backend=backend, max_rule=max_rule,
                   final_activation=final_activation, rules=rules, precision=precision,
                   output=output or (graph_outputs[0] if len(graph_outputs) > 1 else None))
    notes: list[str] = []
    if inputs is None:
        inputs = generate_inputs(ex, samples, seed)
        notes.append("inputs: standard normal of the declared shapes" +
                     ("" if baselines is not None else "; baselines: zeros"))
    batch = ex.prepare_inputs(inputs, baselines, need_reference=True)
    n = batch.n
    targets = [output] if output else (_float_outputs(ex) or [ex.output])
    explained = list(dict.fromkeys(ex.explained_tensor(t)[0] for t in targets))
    for t in targets:
        stripped = ex.explained_tensor(t)
        if stripped[1]:
            notes.append(f"final {stripped[1]} of {t!r} stripped: explained at {stripped[0]!r}")
    forward_outputs = tuple(dict.fromkeys(explained + [o for o in graph_outputs
                                                       if o not in ex.graph.constants]))
    rng = np.random.default_rng(seed + 1)
    node_checks: dict[str, NodeCheck] = {}
    residual_rows, scale_rows = [], []
    step = _fixed_batch(ex, n)
    for start in range(0, n, step):
        part = batch.samples(start, start + step)
        p = part.n
        run = ex.forward(part, outputs=forward_outputs)
        seeds = {}
        for t in explained:
            value = run.actual(t)
            seeds[t] = rng.standard_normal((1,) + tuple(value.shape)).astype(value.dtype)

        def observe(node, ctx, grad_outs, grad_ins, _start=start):
            record = node_checks.get(node.name)
            if record is None:
                record = node_checks[node.name] = NodeCheck(node.name, node.op_type, node.domain, rtol=rtol)
            try:
                out_sum = out_abs = in_sum = in_abs = 0.0
                k = None
                for j, g in enumerate(grad_outs):
                    if g is None or not node.outputs[j]:
                        continue
                    g = to_host(g).astype(np.float64)
                    k = g.shape[0]
                    dy = _difference(ctx.y(j), ctx.y0(j))
                    term = _samples_first(run, node.outputs[j], g * dy[None])
                    out_sum = out_sum + _rows(term, k, p)
                    out_abs = out_abs + _rows(np.abs(term), k, p)
                if k is None:
                    return
                if not isinstance(grad_ins, (tuple, list)):
                    record.error = f"backward returned {type(grad_ins).__name__}, not a tuple"
                    return
                for i, g in enumerate(grad_ins):
                    if g is None or i >= len(node.inputs) or not node.inputs[i] or ctx.is_const(i):
                        continue
                    g = to_host(g).astype(np.float64)
                    dx = _difference(ctx.x(i), ctx.x0(i))
                    term = _samples_first(run, node.inputs[i], g * dx[None])
                    in_sum = in_sum + _rows(term, k, p)
                    in_abs = in_abs + _rows(np.abs(term), k, p)
                residual = np.broadcast_to(np.asarray(out_sum - in_sum), (k, p))
                scale = np.broadcast_to(np.maximum(out_abs, in_abs), (k, p))
                record._update(residual, scale, _start)
            except Exception as exc:  # a rule returned unusable multipliers: say which node
                record.error = f"{type(exc).__name__}: {exc}"

        # float inputs and, for integer (held) inputs, their embeddings: what DeepLIFT attributes
        grads = ex.backward(run, seeds, observer=observe)
        total_in = np.zeros(p)
        abs_in = np.zeros(p)
        for name in ex.attributed:
            g = grads.get(name)
            if g is None:
                continue
            dx = _difference(run.actual(name), run.reference(name))
            term = _samples_first(run, name, to_host(g).astype(np.float64)[:1] * dx[None])[0]
            total_in += term.reshape(p, -1).sum(axis=1)
            abs_in += np.abs(term).reshape(p, -1).sum(axis=1)
        total_out = np.zeros(p)
        abs_out = np.zeros(p)
        for t in explained:
            dy = _difference(run.actual(t), run.reference(t))
            term = to_host(seeds[t]).astype(np.float64)[0] * dy
            total_out += term.reshape(p, -1).sum(axis=1)
            abs_out += np.abs(term).reshape(p, -1).sum(axis=1)
        residual_rows.append(total_in - total_out)
        scale_rows.append(np.maximum(abs_in, abs_out))

    residual = np.concatenate(residual_rows)
    relative = np.abs(residual) / (np.concatenate(scale_rows) + _TINY)
    summation = SummationCheck(residual, relative, rtol)
    order = {name: i for i, name in enumerate(ex.graph.order)}
    nodes = sorted(node_checks.values(), key=lambda c: order.get(c.name, len(order)))

    domains = custom_domains(proto)
    if domains:
        forward = ForwardCheck("skipped", note=f"onnxruntime cannot run ops of custom domain(s) "
                                               f"{', '.join(map(repr, domains))}; forward not compared",
                               rtol=forward_rtol, atol=forward_atol)
    else:
        outs = tuple(o for o in graph_outputs if o not in ex.graph.constants)
        ours = [_rules_forward(ex, batch.samples(i, i + step), outs) for i in range(0, n, step)]
        forward = _forward_vs_ort(model, proto, ex, batch.inputs, step,
                                  {o: _concat([part[o] for part in ours]) for o in outs},
                                  forward_rtol, forward_atol)
    return CheckReport(label, nodes, summation, forward, n, rtol, max_rule, explained, notes)


def _rules_forward(ex: Explainer, batch, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
    """liftir's own forward (every rule's `forward`, never onnxruntime) of the actual rows."""
    run = ex.forward(batch, outputs=outputs, reference=False, onnxruntime=False)
    return {o: to_host(run.device(o)) for o in outputs}


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts[0].ndim and len(parts) > 1 else parts[0]


def _forward_vs_ort(source, proto, ex, xs, step, ours, rtol, atol) -> ForwardCheck:
    try:
        session = _ort_session(source, proto)
        names = [o.name for o in session.get_outputs()]
        parts: dict[str, list[np.ndarray]] = {o: [] for o in names}
        for start in range(0, xs[0].shape[0], step):
            feeds = {name: np.ascontiguousarray(x[start:start + step]) for name, x in zip(ex.input_names, xs)}
            for o, v in zip(names, session.run(names, feeds)):
                parts[o].append(np.asarray(v))
        theirs = {o: _concat(v) for o, v in parts.items()}
    except Exception as exc:  # not liftir's failure: say so and move on
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ForwardCheck("skipped", note=f"onnxruntime could not run the model: {first}",
                            rtol=rtol, atol=atol)
    return _compare(ours, theirs, rtol, atol)


def exercise_rules(ex: Explainer, inputs=None, output: str | None = None, samples: int = 2,
                   seed: int = 0) -> list[str]:
    """Run every rule on the way to the explained output(s) once, forward and backward.

    Op coverage alone cannot see a rule's own requirements (a Div by an activation, a Pow
    with a computed exponent, a pad of the batch axis): they are met or not only once the
    rule runs. This runs what `Explainer.attribute` runs, with each rule's own forward
    (never onnxruntime) and the explainer's method, and lets the rule's LiftirError out.
    Inputs default to standard normal of the declared shapes. Returns the explained
    tensors.
    """
    if inputs is None:
        inputs = generate_inputs(ex, samples, seed)
    batch = ex.prepare_inputs(inputs, None, need_reference=ex.method.uses_reference)
    targets = [output or ex.output] if (output or ex.output) else _float_outputs(ex)
    for t in targets:
        ex.plan.require((t,))
    explained = list(dict.fromkeys(ex.explained_tensor(t)[0] for t in targets))
    run = ex.forward(batch.samples(0, _fixed_batch(ex, batch.n)), outputs=explained, onnxruntime=False)
    rng = np.random.default_rng(seed + 1)
    seeds = {}
    for t in explained:
        value = run.actual(t)
        seeds[t] = rng.standard_normal((1,) + tuple(value.shape)).astype(value.dtype)
    ex.backward(run, seeds, ex.input_names)
    return explained
