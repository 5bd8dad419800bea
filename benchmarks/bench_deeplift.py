"""DeepLIFT wall-clock benchmark: liftir vs Captum, with an onnxruntime forward as the yardstick.

For each model, in one process: the median (after a warm-up) of
  * ORT forward      onnxruntime InferenceSession.run on the batch (default session options)
  * Captum DeepLift  DeepLift(model).attribute(x, baselines=zeros, target=t) on the torch model
  * liftir DeepLIFT  Explainer(onnx_model, method="deeplift").attribute(x, baselines=x0, target=t)
                     (the Explainer is built once, outside the timed loop, like the ORT session)
  * liftir compiled  the same with engine="compiled" (one onnxruntime session per pass; its first
                     call, which compiles, is reported apart)
  * floor            what no implementation of the pass can skip (issue #10): the forward over
                     the N+1 rows of [actual; reference] plus the compiled backward's linear maps
                     (transposed convolutions, matrix products) alone, on inputs of their shapes,
                     in the compiled engine's row groups on several threads (`floor_ms`)
Run ``python benchmarks/bench_deeplift.py --help``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the model zoo lives with the tests
sys.path.insert(0, str(ROOT))

import zoo  # noqa: E402

try:
    import liftir  # noqa: E402
    from liftir.compile import forms  # noqa: E402

    LIFTIR_ERROR = None if hasattr(liftir, "Explainer") else "liftir has no Explainer yet"
except Exception as e:  # keep the ORT/Captum columns even when liftir does not import
    liftir = forms = None
    LIFTIR_ERROR = f"import liftir failed: {type(e).__name__}: {e}"


@dataclass(frozen=True)
class Bench:
    name: str
    batch: int
    kwargs: dict = field(default_factory=dict)


BENCHES = {
    "all_conv": Bench("all_conv", 32, {"width": 96}),  # the paper's All-CNN-C widths (96/192)
    "vgg_maxpool": Bench("vgg_maxpool", 16),
    "residual_bn": Bench("residual_bn", 16),
    "resnet18": Bench("resnet18", 8),
    "wide_mlp": Bench("wide_mlp", 4096),
}


def timed(fn, repeats: int, warmup: int):
    """Median wall-clock ms of ``fn()`` over ``repeats`` calls after ``warmup`` calls, and
    the last result (so the outputs can be compared)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out


#: the ops of the compiled backward that carry its FLOPs (the multipliers' linear maps)
LINEAR_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def linear_backward(compiled_model):
    """A model of the compiled pass's backward linear nodes alone, each fed inputs of its
    shapes, and those feeds (random): the backward half of the floor."""
    import onnx
    from onnx import helper

    inferred = onnx.shape_inference.infer_shapes(compiled_model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    constants = {t.name: t for t in compiled_model.graph.initializer}
    forward = {o.name for o in compiled_model.graph.output if not o.name.startswith("liftir_")}
    nodes = [n for n in compiled_model.graph.node if n.op_type in LINEAR_OPS and n.name.startswith("liftir/")
             and not set(n.output) & forward]
    feeds, inputs, inits, outputs = {}, [], {}, []
    rng = np.random.default_rng(0)
    for n in nodes:
        for i in n.input:
            if not i or i in feeds or i in inits:
                continue
            if i in constants:
                inits[i] = constants[i]
                continue
            shape = shapes.get(i)
            if not shape or not all(shape):
                raise RuntimeError(f"no shape for {i!r}, an input of {n.name!r}")
            feeds[i] = rng.standard_normal(shape).astype(np.float32)
            inputs.append(helper.make_tensor_value_info(i, onnx.TensorProto.FLOAT, shape))
        outputs += [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in n.output]
    model = helper.make_model(helper.make_graph(nodes, "floor", inputs, outputs, list(inits.values())),
                              opset_imports=compiled_model.opset_import)
    return model, feeds


def floor_ms(proto, compiled, x: np.ndarray, x0: np.ndarray, repeats: int, warmup: int) -> float:
    """The floor: the model's forward over the N+1 rows plus the backward's linear maps, run
    as the compiled engine runs the pass: whole on every thread, or, on several threads, in
    its row groups at once on one thread each (liftir/compile/engine.py `row_groups`), each
    group's forward over its samples and the reference row, then its linear maps."""
    import onnxruntime as ort
    from concurrent.futures import ThreadPoolExecutor

    engine = compiled._compiled
    groups = engine.row_groups(0, len(x))
    passes = {key[2]: p for key, p in engine.passes.items() if p is not None}
    options = ort.SessionOptions()
    if len(groups) > 1:
        options.intra_op_num_threads = 1

    def group_run(a, b):
        fwd = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feed = {fwd.get_inputs()[0].name: np.concatenate([x[a:b], x0[:1]])}
        model, feeds = linear_backward(passes[b - a].model)
        bwd = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return lambda: (fwd.run(None, feed), bwd.run(None, feeds))

    runs = [group_run(a, b) for a, b in groups]
    if len(runs) == 1:
        return timed(runs[0], repeats, warmup)[0]
    with ThreadPoolExecutor(len(runs)) as pool:
        return timed(lambda: list(pool.map(lambda run: run(), runs)), repeats, warmup)[0]


def run_one(b: Bench, repeats: int, warmup: int, target: int, dynamo: bool) -> dict:
    import onnxruntime as ort
    from captum.attr import DeepLift

    model = zoo.build(b.name, **b.kwargs)
    x = zoo.make_input(b.name, b.batch, seed=1)
    x_np = x.numpy()
    x0 = torch.zeros_like(x)
    x0_np = x0.numpy()
    proto = zoo.export(model, zoo.make_input(b.name, 2), None, dynamo=dynamo)
    row = {"model": b.name, "batch": b.batch, "shape": "x".join(map(str, x.shape[1:])),
           "caveat": zoo.captum_caveat(b.name, **b.kwargs)}

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x_np}
    row["ort_ms"], _ = timed(lambda: sess.run(None, feed), repeats, warmup)
    del sess

    def captum():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return DeepLift(model).attribute(x, baselines=x0, target=target)

    row["captum_ms"], captum_attr = timed(captum, repeats, warmup)
    captum_attr = captum_attr.detach().numpy()

    row["liftir_ms"] = row["agree"] = row["setup_ms"] = row["first_ms"] = None
    row["liftir_error"] = LIFTIR_ERROR
    if LIFTIR_ERROR is None:
        try:
            t0 = time.perf_counter()
            explainer = liftir.Explainer(proto, method="deeplift")
            row["setup_ms"] = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()  # the first call: the row cost, the pass's trace, its sessions
            explainer.attribute(x_np, baselines=x0_np, target=target)
            row["first_ms"] = (time.perf_counter() - t0) * 1e3
            row["liftir_ms"], attr = timed(
                lambda: explainer.attribute(x_np, baselines=x0_np, target=target), repeats, warmup)
            attr = np.asarray(attr)
            row["agree"] = float(np.abs(attr - captum_attr).max() / max(np.abs(captum_attr).max(), 1e-12))
        except Exception as e:
            row["liftir_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            if os.environ.get("LIFTIR_BENCH_TRACEBACK"):
                traceback.print_exc()
    row.update(compiled_ms=None, compile_ms=None, compiled_agree=None, compiled_error=None, floor_ms=None)
    if LIFTIR_ERROR is None and row["liftir_ms"] is not None:
        try:
            compiled = liftir.Explainer(proto, method="deeplift", engine="compiled")
            t0 = time.perf_counter()  # the first call traces, builds and starts the session
            compiled.attribute(x_np, baselines=x0_np, target=target)
            row["compile_ms"] = (time.perf_counter() - t0) * 1e3
            if not all(p is not None for p in compiled._compiled.passes.values()):
                raise RuntimeError("fell back to the interpreter: " + "; ".join(compiled._compiled.reasons.values()))
            row["compiled_ms"], cattr = timed(  # timed past the passes' form trial
                lambda: compiled.attribute(x_np, baselines=x0_np, target=target), repeats,
                max(warmup, forms.SETTLED_AFTER))
            row["compiled_agree"] = float(np.abs(np.asarray(cattr) - attr).max() / max(np.abs(attr).max(), 1e-12))
            row["floor_ms"] = floor_ms(proto, compiled, x_np, x0_np, repeats, warmup)
        except Exception as e:
            row["compiled_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            if os.environ.get("LIFTIR_BENCH_TRACEBACK"):
                traceback.print_exc()
    return row


def _ms(v):
    return "n/a" if v is None else (f"{v:.1f}" if v < 1000 else f"{v:.0f}")


def _ratio(a, b):
    return "n/a" if a is None or b is None else f"{a / b:.2f}"


def table(rows: list[dict]) -> str:
    head = ("| model | batch | input | ORT fwd ms | Captum ms | liftir ms | liftir/Captum | "
            "liftir/ORT-fwd | Captum/ORT-fwd | max rel diff vs Captum | liftir compiled ms | "
            "compiled/Captum | compiled/ORT-fwd | compiled vs interpreted | floor ms | floor/ORT-fwd | compiled/floor |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    notes: list[str] = []
    for r in rows:
        mark = ""
        if r["caveat"]:
            notes.append(f"{r['model']}: Captum is not an exact reference: {r['caveat']}")
            mark += f" [{len(notes)}]"
        if r["liftir_error"] and r["liftir_error"] != LIFTIR_ERROR:
            notes.append(f"{r['model']}: liftir failed: {r['liftir_error']}")
            mark += f" [{len(notes)}]"
        agree = "n/a" if r["agree"] is None else f"{r['agree']:.1e}"
        cagree = "n/a" if r.get("compiled_agree") is None else f"{r['compiled_agree']:.1e}"
        if r.get("compiled_error"):
            notes.append(f"{r['model']}: liftir compiled failed: {r['compiled_error']}")
            mark += f" [{len(notes)}]"
        lines.append(
            f"| {r['model']}{mark} | {r['batch']} | {r['shape']} | {_ms(r['ort_ms'])} | {_ms(r['captum_ms'])} | "
            f"{_ms(r['liftir_ms'])} | {_ratio(r['liftir_ms'], r['captum_ms'])} | {_ratio(r['liftir_ms'], r['ort_ms'])} | "
            f"{_ratio(r['captum_ms'], r['ort_ms'])} | {agree} | {_ms(r.get('compiled_ms'))} | "
            f"{_ratio(r.get('compiled_ms'), r['captum_ms'])} | {_ratio(r.get('compiled_ms'), r['ort_ms'])} | "
            f"{cagree} | {_ms(r.get('floor_ms'))} | {_ratio(r.get('floor_ms'), r['ort_ms'])} | "
            f"{_ratio(r.get('compiled_ms'), r.get('floor_ms'))} |")
    extra = []
    if LIFTIR_ERROR:
        extra.append(f"liftir columns empty: {LIFTIR_ERROR}")
    setups = [f"{r['model']} {_ms(r['setup_ms'])}" for r in rows if r["setup_ms"] is not None]
    if setups:
        extra.append("liftir Explainer construction (not in the liftir column), ms: " + ", ".join(setups))
    firsts = [f"{r['model']} {_ms(r['first_ms'])}" for r in rows if r.get("first_ms") is not None]
    if firsts:
        extra.append("liftir: first call (row cost, the pass's trace for what its forward returns, onnxruntime "
                     "sessions, one pass; not in its column), ms: " + ", ".join(firsts))
    compiles = [f"{r['model']} {_ms(r['compile_ms'])}" for r in rows if r.get("compile_ms") is not None]
    if compiles:
        extra.append("liftir compiled: first call (trace + onnxruntime session + one pass; not in its "
                     "column), ms: " + ", ".join(compiles))
    foot = [f"[{i}] {n}" for i, n in enumerate(notes, 1)] + extra
    return "\n".join(lines + ([""] + [f"{f}  " for f in foot] if foot else []))


def _load() -> str:
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def header(args, load_before: str) -> str:
    import captum
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"CPU: {cpu}, os.cpu_count()={os.cpu_count()}, torch threads={torch.get_num_threads()}; "
            f"torch {torch.__version__}, onnxruntime {ort.__version__}, captum {captum.__version__}, "
            f"numpy {np.__version__}; exporter={'dynamo' if args.dynamo else 'torchscript'}; "
            f"median of {args.repeats} after {args.warmup} warm-up (compiled: {max(args.warmup, forms.SETTLED_AFTER if forms else 0)}, past its passes' form trial); target={args.target}; baseline=zeros; "
            f"{time.strftime('%Y-%m-%d %H:%M')}; load average (1/5/15 min) before {load_before}, "
            f"after {_load()} (anything well above 0 before means other processes shared the cores)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(BENCHES), help=f"comma list from {','.join(BENCHES)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--target", type=int, default=1, help="output column (logit) explained")
    p.add_argument("--dynamo", action="store_true", help="export with the dynamo exporter (default TorchScript)")
    p.add_argument("--write", action="store_true", help="also write benchmarks/results.md")
    args = p.parse_args(argv)

    torch.set_num_threads(os.cpu_count() or 1)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"unknown models {unknown}; choose from {list(BENCHES)}")

    load_before = _load()
    rows = []
    for n in names:
        print(f"... {n}", file=sys.stderr, flush=True)
        rows.append(run_one(BENCHES[n], args.repeats, args.warmup, args.target, args.dynamo))
    text = f"{header(args, load_before)}\n\n{table(rows)}\n"
    print(text)
    if args.write:
        out = Path(__file__).resolve().parent / "results.md"
        old = out.read_text() if out.exists() else ""
        kept = old[old.index("\n## Memory"):] if "\n## Memory" in old else ""  # bench_memory.py's section
        out.write_text("# DeepLIFT benchmark results\n\n"
                       "Produced by `python benchmarks/bench_deeplift.py --write`; see README.md.\n\n" + text + kept)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
