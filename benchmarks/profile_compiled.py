"""Where a compiled DeepLIFT pass spends its time, per model node's rule and per ONNX op.

The compiled engine names every node a rule's backward emits after the model node it
explains (``liftir/<node> (<op>) backward/n<k>``), so onnxruntime's own profiler, run on the
compiled graph with the feeds of a real call, says which rules cost what. The model's
forward nodes keep their names. One thread by default: the costs then add up to the pass.

    python benchmarks/profile_compiled.py vit                 # a bench_architectures model
    python benchmarks/profile_compiled.py residual_bn --top 15  # a bench_deeplift model
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

BACKWARD = re.compile(r"^liftir/(?P<node>.*) \((?P<op>[^()]*)\) backward/")


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


def profile(name: str, repeats: int, target: int = 1):
    """(ms per run by rule, by op type, by (rule, op type), and in all) of the compiled pass."""
    import liftir
    import onnxruntime as ort
    proto, x, x0 = model_and_inputs(name)
    ex = liftir.Explainer(proto, "deeplift", engine="compiled")
    ex.attribute(x, baselines=x0, target=target)
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
    ex.attribute(x, baselines=x0, target=target)
    compiled.session.run = run
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("LIFTIR_NUM_THREADS", "1"))
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(compiled.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for _ in range(repeats + 1):
            session.run(seen["outputs"], seen["feeds"])
        events = json.loads(Path(session.end_profiling()).read_text())
    by_rule, by_op, by_rule_op = collections.Counter(), collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        node, op = event["name"][: -len("_kernel_time")], event["args"]["op_name"]
        if op in ("If", "Loop"):  # the nodes of its branches are profiled (and named) themselves
            continue
        found = BACKWARD.match(node)
        rule = f"{found['node']} ({found['op']}) backward" if found else (
            "forward: " + op if not node.startswith("liftir/") else "liftir: seeds, slices, outputs")
        by_rule[rule] += event["dur"]
        by_op[op] += event["dur"]
        by_rule_op[rule, op] += event["dur"]
    scale = 1 / (1000 * (repeats + 1))  # microseconds over all runs -> ms per run

    def per_run(counter):
        return collections.Counter({k: v * scale for k, v in counter.items()})
    return per_run(by_rule), per_run(by_op), per_run(by_rule_op), sum(by_op.values()) * scale


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a name in bench_deeplift.BENCHES or bench_architectures.BENCHES")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--ops-of", type=int, default=0, metavar="K", help="also the ops inside the K costliest rules")
    args = p.parse_args(argv)
    os.environ.setdefault("LIFTIR_NUM_THREADS", "1")
    warnings.simplefilter("ignore")
    by_rule, by_op, by_rule_op, total = profile(args.model, args.repeats)
    families = collections.Counter()
    for rule, ms in by_rule.items():
        found = re.search(r"\((\w+)\) backward$", rule)
        families[f"{found.group(1)} backward" if found else rule.split(":")[0]] += ms
    print(f"{args.model}: compiled DeepLIFT pass, {total:.1f} ms per run in onnxruntime kernels "
          f"({os.environ['LIFTIR_NUM_THREADS']} thread(s), mean of {args.repeats + 1} runs; the profiler "
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
