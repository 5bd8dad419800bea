"""Where a compiled DeepLIFT pass spends its time, per model node's rule and per ONNX op.

The compiled engine names every node a rule's backward emits after the model node it
explains (``liftir/<node> (<op>) backward/n<k>``), so onnxruntime's own profiler, run on the
compiled graph with the feeds of a real call, says which rules cost what. The model's
forward nodes keep their names. onnxruntime's NCHWc layout pass renames the convolutions it
rewrites after their outputs: a rule's rewritten convolutions land in the "liftir" bucket, and
the reorders it inserts have a bucket of their own. One thread by default: the costs then add
up to the pass.

    python benchmarks/profile_compiled.py vit                 # a bench_architectures model
    python benchmarks/profile_compiled.py residual_bn --top 15  # a bench_deeplift model
    python benchmarks/profile_compiled.py swin --slowest 20     # the nodes slowest per element

`--slowest` lists the nodes (convolutions and matrix products aside) with the most time per
element of their largest operand: where onnxruntime's kernel takes a slow path for those
shapes. It found that a scalar times a [16, 16, 16, 1] row statistic ran 40x slower than
with a [1, 1, 1, 1] (README, "Constants against rows' statistics").
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

BACKWARD = re.compile(r"^liftir/(?P<node>.*) \((?P<op>[^()]*)\) backward/")
LAYOUT = ("ReorderInput", "ReorderOutput")  # inserted by onnxruntime around its NCHWc convolutions
#: runs left out of the figures: onnxruntime's arena grows during the first two, and the page
#: faults of fresh memory made single kernels 8x slower there (a Max of 16x32x64x64: 3.6 ms, then 0.5)
WARM_UP = 2


def model_and_inputs(name: str):
    """(ONNX model, attribute's inputs, baselines) of a bench_deeplift or bench_architectures model."""
    import numpy as np
    import bench_architectures
    import bench_deeplift
    if name in bench_deeplift.BENCHES:
        import zoo
        bench = bench_deeplift.BENCHES[name]
        model = zoo.build(name, **bench.kwargs)
        x = zoo.make_input(name, bench.batch).numpy()
        return zoo.export(model, zoo.make_input(name, 2)), x, np.zeros_like(x[:1])
    how, _, _ = bench_architectures.BENCHES[name]
    model, inputs, names, baselines, layer = bench_architectures.build(name)
    proto = bench_architectures.export(model, inputs, names, how)
    feeds = {n: t.numpy() for n, t in zip(names, inputs)}
    if layer is None:
        return proto, feeds[names[0]], baselines[0].numpy()
    return proto, feeds, {n: b.numpy() for n, b in zip(names, baselines)}


#: ops left out of `--slowest`: their time goes with their arithmetic, not their operands' size
_COMPUTE = frozenset({"Conv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm", "FusedConv", "FusedGemm",
                      "LSTM", "GRU", "RNN", "MaxPool", "AveragePool", "If", "Loop", "Scan"})


def _elements(shapes: list) -> int:
    """The size of the largest of a profiled node's operand shapes."""
    return max([1] + [int(math.prod(next(iter(s.values())))) for s in shapes if s])


def profile(name: str, repeats: int, target: int = 1, method: str = "deeplift", tiled: bool = False,
            slowest: list | None = None, **options) -> collections.Counter:
    """Kernel ms per run of the compiled pass, by (rule, op type). `slowest`, a list, receives
    (ns per element, us per run, op, node, input shapes) of each node outside `_COMPUTE`, the
    most time per element first."""
    import liftir
    import onnxruntime as ort
    proto, x, x0 = model_and_inputs(name)
    ex = liftir.Explainer(proto, method, engine="compiled")
    ex.attribute(x, baselines=x0, target=target, **options)
    passes = [p for p in ex._compiled.passes.values() if p is not None]
    if len(passes) != 1:
        raise SystemExit(f"{name}: expected one compiled pass, got {len(passes)} (see the log for why)")
    compiled = passes[0]
    seen = {}
    run = compiled.session.run

    def spy(outputs, feeds, *args, **kwargs):
        seen.update(outputs=outputs, feeds=dict(feeds))
        return run(outputs, feeds, *args, **kwargs)

    compiled.session.run = spy
    ex.attribute(x, baselines=x0, target=target, **options)
    compiled.session.run = run
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("LIFTIR_NUM_THREADS", "1"))
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = str(Path(folder) / "profile")
        model = compiled.tiled_form(threads=options.intra_op_num_threads) if tiled else None
        if tiled and model is None:
            raise SystemExit(f"{name}: no tiled form on {options.intra_op_num_threads} thread(s) (no chain pays)")
        if model is None:  # the two forms a one-thread pass picks from (liftir/compile/forms.py)
            model = compiled.model
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for _ in range(WARM_UP + repeats):
            session.run(seen["outputs"], seen["feeds"])
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted(e["ts"] + e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    steady = runs[WARM_UP - 1]  # kernels that start after the warm-up runs ended
    by_rule_op = collections.Counter()
    per_node = collections.defaultdict(lambda: [0.0, None, None])  # node -> [us per run, op, shapes]
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time") or event["ts"] < steady:
            continue
        node, op = event["name"][: -len("_kernel_time")], event["args"]["op_name"]
        if op in ("If", "Loop"):  # the nodes of its branches are profiled (and named) themselves
            continue
        found = BACKWARD.match(node)
        if found:
            rule = f"{found['node']} ({found['op']}) backward"
        elif op in LAYOUT:
            rule = "onnxruntime: NCHWc layout reorders"
        elif node.startswith("liftir/"):  # layout rewrites rename a rule's convs after their outputs
            rule = "liftir: seeds, slices, outputs, nodes renamed by onnxruntime"
        else:
            rule = "forward: " + op
        by_rule_op[rule, op] += event["dur"] / (1000 * repeats)  # microseconds -> ms per run
        if slowest is not None and op not in _COMPUTE:
            per_node[node][0] += event["dur"] / repeats
            per_node[node][1:] = [op, (event["args"].get("input_type_shape", []),
                                       event["args"].get("output_type_shape", []))]
    if slowest is not None:
        for node, (us, op, (inputs, outputs)) in per_node.items():
            size = _elements(inputs + outputs)
            if size >= 4096:  # below, a node's fixed overhead is its time
                slowest.append((1000 * us / size, us, op, node, [next(iter(s.values())) for s in inputs if s]))
        slowest.sort(reverse=True)
    return by_rule_op


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a name in bench_deeplift.BENCHES or bench_architectures.BENCHES")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--ops-of", type=int, default=0, metavar="K", help="also the ops inside the K costliest rules")
    p.add_argument("--method", default="deeplift", help="any liftir method (default deeplift)")
    p.add_argument("--steps", type=int, default=None, help="n_steps, for integrated_gradients")
    p.add_argument("--tiled", action="store_true", help="profile the pass's tiled form (one thread only)")
    p.add_argument("--slowest", type=int, default=0, metavar="K",
                   help="also the K nodes with the most time per element (convolutions and products aside)")
    args = p.parse_args(argv)
    os.environ.setdefault("LIFTIR_NUM_THREADS", "1")
    warnings.simplefilter("ignore")
    options = {} if args.steps is None else {"n_steps": args.steps}
    slowest = [] if args.slowest else None
    by_rule_op = profile(args.model, args.repeats, method=args.method, tiled=args.tiled, slowest=slowest, **options)
    by_rule, by_op, families = collections.Counter(), collections.Counter(), collections.Counter()
    for (rule, op), ms in by_rule_op.items():
        by_rule[rule] += ms
        by_op[op] += ms
        found = re.search(r"\((\w+)\) backward$", rule)
        families[f"{found.group(1)} backward" if found else rule.split(":")[0]] += ms
    total = sum(by_op.values())
    print(f"{args.model}: compiled {args.method} pass, {total:.1f} ms per run in onnxruntime kernels "
          f"({os.environ['LIFTIR_NUM_THREADS']} thread(s), mean of {args.repeats} runs after {WARM_UP} warm-up; the profiler "
          f"adds a per-node cost, so read the shares rather than the times)\n")
    for title, counter in (("by rule family", families), ("by model node", by_rule), ("by ONNX op", by_op)):
        print(f"| {title} | ms | % |\n|---|---|---|")
        for key, ms in counter.most_common(args.top):
            print(f"| {key} | {ms:.2f} | {100 * ms / total:.1f} |")
        print()
    for rule, _ in [kv for kv in by_rule.most_common() if kv[0].endswith(" backward")][:args.ops_of]:
        inside = collections.Counter({op: ms for (r, op), ms in by_rule_op.items() if r == rule})
        print(f"| {rule}: op | ms | % |\n|---|---|---|")
        for op, ms in inside.most_common(args.top):
            print(f"| {op} | {ms:.2f} | {100 * ms / total:.1f} |")
        print()
    if slowest:
        print("| ns per element | us | op | inputs | node |\n|---|---|---|---|---|")
        for per_element, us, op, node, inputs in slowest[:args.slowest]:
            print(f"| {per_element:.2f} | {us:.1f} | {op} | {inputs} | {node[-60:]} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
