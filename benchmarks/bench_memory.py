"""Peak memory (RSS) of DeepLIFT-SHAP on a BPNet-like model (issue 7, "memory by default").

BPNet-like: one-hot DNA (N, 2114, 4) -> Conv1d(4, C, 21) -> ReLU -> L dilated residual
blocks Conv1d(C, C, 3, dilation 2^i) -> ReLU -> add -> global average -> linear count
head; C = 64, L = 9 as in BPNet (Avsec et al. 2021), deterministic random weights, built
with onnx.helper (no torch needed). Each case runs in its own subprocess (so one case's
peak cannot hide another's) and reports the child's peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss` at exit) and the wall time of `attribute`.

    python benchmarks/bench_memory.py [--n 4] [--refs 20] [--write]

Cases: the default (`max_memory` 1 GiB), 2 GiB and 512 MiB budgets, `batch_size=1`, and the old
behaviour, every sample and reference in one pass (`max_memory=None`). `--write` puts the
table in benchmarks/results.md between the MEMORY markers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CASES = {
    "default (max_memory 1 GiB)": {},
    "max_memory='2GiB'": {"max_memory": "2GiB"},
    "max_memory='512MiB'": {"max_memory": "512MiB"},
    "batch_size=1 (max_memory=None)": {"batch_size": 1, "max_memory": None},
    "unbounded (old default: max_memory=None)": {"max_memory": None},
}


def bpnet_like(length: int = 2114, channels: int = 64, layers: int = 9, seed: int = 0):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    consts, nodes = {}, [helper.make_node("Transpose", ["x"], ["h0"], perm=[0, 2, 1])]

    def conv(name, src, c_in, k, dilation=1):
        consts[f"{name}_w"] = (rng.standard_normal((channels, c_in, k)) / np.sqrt(c_in * k)).astype(np.float32)
        consts[f"{name}_b"] = (0.1 * rng.standard_normal(channels)).astype(np.float32)
        pad = dilation * (k - 1) // 2
        nodes.append(helper.make_node("Conv", [src, f"{name}_w", f"{name}_b"], [name], kernel_shape=[k],
                                      dilations=[dilation], pads=[pad, pad]))
        nodes.append(helper.make_node("Relu", [name], [f"{name}_r"]))
        return f"{name}_r"

    h = conv("stem", "h0", 4, 21)
    for i in range(layers):
        r = conv(f"d{i}", h, channels, 3, 2 ** (i + 1))
        nodes.append(helper.make_node("Add", [h, r], [f"s{i}"]))
        h = f"s{i}"
    consts["head_w"] = (rng.standard_normal((channels, 1)) / channels).astype(np.float32)
    nodes += [helper.make_node("ReduceMean", [h], ["pooled"], axes=[2], keepdims=0),
              helper.make_node("MatMul", ["pooled", "head_w"], ["count"])]
    graph = helper.make_graph(nodes, "bpnet_like",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", length, 4])],
                              [helper.make_tensor_value_info("count", TensorProto.FLOAT, ["N", 1])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def child(case: str, n: int, refs: int) -> None:
    """One case: build, explain n sequences with `refs` shuffled references each, report."""
    import resource
    import time
    import numpy as np
    import liftir
    from liftir.genomics import dinucleotide_shuffle

    rng = np.random.default_rng(0)
    x = np.eye(4, dtype=np.float32)[rng.integers(0, 4, (n, 2114))]
    shuffles = dinucleotide_shuffle(x, refs, seed=1)  # (n, refs, 2114, 4)
    ex = liftir.Explainer(bpnet_like(), "deeplift_shap")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    attr, delta = ex.attribute(x, shuffles, return_convergence_delta=True, **CASES[case])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"case": case, "peak_mib": peak / 1024, "before_mib": before / 1024, "seconds": seconds,
                      "pass": f"{ex.last_pass.rows} pairs x {ex.last_pass.targets} target, "
                              f"{ex.last_pass.passes} passes",
                      "max_abs_delta": float(np.abs(delta).max()), "checksum": float(np.abs(attr).sum())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="sequences")
    parser.add_argument("--refs", type=int, default=20, help="dinucleotide shuffles per sequence")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.n, args.refs)
        return
    rows = []
    for case in args.cases:
        out = subprocess.run([sys.executable, __file__, "--child", case, "--n", str(args.n), "--refs", str(args.refs)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    checks = {round(r["checksum"], 1) for r in rows}
    lines = [f"DeepLIFT-SHAP, BPNet-like (2114 bp, 64 channels, 9 dilated residual blocks), {args.n} sequences x "
             f"{args.refs} dinucleotide shuffles (`benchmarks/bench_memory.py`; peak RSS of a subprocess per case, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
             f"{os.getloadavg()[0]:.1f}); the attributions are the same in every case (sum |a| "
             f"{', '.join(str(c) for c in sorted(checks))}):", "",
             "| case | peak RSS MiB | RSS before attribute MiB | seconds | passes | max abs delta |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['peak_mib']:.0f} | {r['before_mib']:.0f} | {r['seconds']:.1f} | "
                     f"{r['pass']} | {r['max_abs_delta']:.1e} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        path = ROOT / "results.md"
        text = path.read_text()
        start, end = "<!-- MEMORY:START -->", "<!-- MEMORY:END -->"
        block = f"{start}\n{table}\n{end}"
        if start in text:
            text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
        else:
            text = text.rstrip("\n") + "\n\n## Memory\n\n" + block + "\n"
        path.write_text(text)


if __name__ == "__main__":
    main()
