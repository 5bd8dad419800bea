"""The genome pipeline on a BPNet-sized model: regions/s, peak memory, 1M-region estimate.

BPNet's counts branch (64 filters, a width-21 stem, 8 dilated residual convolutions with
dilations 2..256, global average pooling, a linear head), 2114 bp windows, 20
dinucleotide shuffles per region, random weights (speed does not depend on training).
Each measurement runs in a fresh process, so its peak RSS is its own:

* liftir single process (`explain_genome`, workers=0), at two region counts: the peak
  memory must not grow with the number of regions;
* liftir on a Dask LocalCluster of 2 workers;
* tangermeme 1.6 `deep_lift_shap` (hypothetical=True) on the same model (PyTorch) and
  the same references (liftir's per-region shuffles), if tangermeme is installed.

    python benchmarks/bench_genome.py --regions 100 --tangermeme-regions 10 [--profile]

`--profile` adds a single-process run with a timer around each stage (FASTA read and
one-hot, shuffles, forward, backward, scores, Zarr write, the rest).

Keep the counts modest on a shared machine; the 10k and 1M figures are extrapolated.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WIDTH = 2114
SHUFFLES = 20


def bpnet_counts(filters: int = 64, layers: int = 8):
    import torch
    from torch import nn

    class BPNetCounts(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv1d(4, filters, 21, padding=10)
            self.convs = nn.ModuleList(nn.Conv1d(filters, filters, 3, padding=2 ** i, dilation=2 ** i)
                                       for i in range(1, layers + 1))
            self.head = nn.Linear(filters, 1)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            for conv in self.convs:
                h = h + torch.relu(conv(h))
            return self.head(h.mean(dim=2))

    torch.manual_seed(0)
    return BPNetCounts().eval()


def build_bpnet(folder: Path) -> Path:
    import torch
    model = bpnet_counts()
    path = folder / "bpnet.onnx"
    torch.onnx.export(model, (torch.zeros(1, 4, WIDTH),), str(path), input_names=["sequence"],
                      output_names=["log_counts"], dynamic_axes={"sequence": {0: "N"}},
                      opset_version=17, dynamo=False)
    return path


def stage_liftir(folder: Path, n: int, workers: int) -> dict:
    from liftir.genome import explain_genome
    out = folder / f"scores_{n}_{workers}_{time.time_ns()}.zarr"
    started, cpu = time.perf_counter(), time.process_time()
    summary = explain_genome(folder / "bpnet.onnx", fasta=folder / "genome.fa",
                             bed=folder / f"peaks_{n}.bed", width=WIDTH, shuffles=SHUFFLES, seed=0,
                             out=out, workers=workers, progress=False, chunk_size=32)
    seconds = time.perf_counter() - started
    return {"regions": summary.regions, "seconds": seconds, "max_abs_delta": summary.max_abs_delta,
            "cpu_work_seconds": time.process_time() - cpu}


def stage_profile(folder: Path, n: int) -> dict:
    """The single-process run with a timer (wall and CPU seconds) around each stage.

    Stages: FASTA read + one-hot, references (dinucleotide shuffles), the compiled pass
    (one onnxruntime session: forward over regions and references, multipliers of every
    pair; with the interpreter engine, its forward and backward instead), scores (actual, hypothetical and delta from the multipliers), the Zarr write,
    and the driver (explainer and store set-up, the summary) as what is left.
    """
    import functools

    from liftir import explainer as explainer_module, scheduler
    from liftir.genome import attribution, pipeline, sequences
    totals: dict[str, list[float]] = {}
    in_task = [False]  # the driver's probe pass (sizing the batches) is not a task's work

    def timed(owner, name, label):
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            task = label == "tasks"
            if not (task or in_task[0]):
                return original(*args, **kwargs)
            in_task[0] = True
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                t = totals.setdefault(label, [0.0, 0.0])
                t[0] += time.perf_counter() - wall
                t[1] += time.process_time() - cpu
                in_task[0] = in_task[0] and not task
        setattr(owner, name, wrapper)

    timed(sequences.FastaSource, "fetch", "fasta read + one-hot")
    timed(pipeline, "make_references", "references (shuffles)")
    from liftir.compile import compiler
    timed(explainer_module.Explainer, "_forward", "forward")
    timed(scheduler, "backward", "backward")
    timed(compiler.CompiledPass, "__call__", "compiled pass")
    timed(attribution, "pair_multipliers", "multipliers (forward + backward + rest)")
    timed(pipeline, "shap_scores", "attribution")
    timed(pipeline.store, "write_chunk", "zarr write")
    timed(pipeline, "run_task", "tasks")
    result = stage_liftir(folder, n, 0)
    t = {k: v for k, v in totals.items()}
    none = [0.0, 0.0]
    stages = {"fasta read + one-hot": t["fasta read + one-hot"],
              "references (shuffles)": t["references (shuffles)"],
              "forward (interpreter)": t.get("forward", none), "backward (interpreter)": t.get("backward", none),
              "compiled pass (forward + backward, one session)": t.get("compiled pass", none),
              "scores (actual, hypothetical, delta)": [a - b for a, b in zip(t["attribution"],
                                                       t["multipliers (forward + backward + rest)"])],
              "zarr write": t["zarr write"]}
    inner = [sum(v[i] for v in stages.values()) for i in (0, 1)]
    stages["other (in tasks)"] = [t["tasks"][i] - inner[i] for i in (0, 1)]
    result["stages"] = stages
    result["tasks"] = t["tasks"]
    return result


def stage_tangermeme(folder: Path, n: int) -> dict:
    import torch
    from tangermeme.deep_lift_shap import deep_lift_shap

    from liftir.genome.references import ReferenceSpec, make_references
    from liftir.genome.regions import read_bed
    from liftir.genome.sequences import FastaSource
    torch.set_num_threads(os.cpu_count() or 1)
    source = FastaSource(str(folder / "genome.fa"))
    regions = read_bed(folder / f"peaks_{n}.bed", WIDTH, source.chrom_sizes())
    x, _, _ = source.fetch(regions)
    refs = make_references(ReferenceSpec(n=SHUFFLES, seed=0), x, regions.index)
    # tangermeme refuses all-zero (N) columns: read them as A, in x and in its shuffles
    # (same shapes, same work; the synthetic genome has a few short N runs)
    x[x.sum(-1) == 0, 0] = 1
    refs = np.array(refs)
    refs[refs.sum(-1) == 0, 0] = 1
    model = bpnet_counts()  # the same seeded weights as the exported ONNX
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1)))
    rt = torch.from_numpy(np.ascontiguousarray(refs.transpose(0, 1, 3, 2)))
    started, cpu = time.perf_counter(), time.process_time()
    deep_lift_shap(model, xt, references=rt, hypothetical=True, batch_size=32, warning_threshold=1e9)
    return {"regions": len(x), "seconds": time.perf_counter() - started,
            "cpu_work_seconds": time.process_time() - cpu}


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return own / 1024


def run_stage(args: list[str]) -> dict | None:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"stage {' '.join(args[:2])} failed:\n{out.stderr[-3000:]}", flush=True)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(name: str, r: dict) -> None:
    rate = r["regions"] / r["seconds"]
    cpu = r["cpu_seconds"] / r["regions"]
    print(f"{name:22s} {r['regions']:5d} regions {r['seconds']:8.1f} s {rate:7.3f} regions/s "
          f"{1 / rate:6.2f} s/region (CPU {cpu:5.2f} s/region)  10k: {1e4 / rate / 3600:6.2f} h  "
          f"1M: {1e6 / rate / 86400:6.1f} days  peak RSS {r['peak_rss_mb']:6.0f} MB "
          f"(largest worker {r['peak_rss_worker_mb']:.0f} MB)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regions", type=int, default=100)
    parser.add_argument("--tangermeme-regions", type=int, default=10)
    parser.add_argument("--only", default=None, help="run only the stages whose name contains this")
    parser.add_argument("--profile", action="store_true",
                        help="also time each stage of a single-process run (wall and CPU)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="then alternate this many liftir / tangermeme runs (same load) and "
                             "report the ratio of their times per round")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        folder = Path(args.folder)
        result = (stage_tangermeme(folder, args.n) if args.stage == "tangermeme"
                  else stage_profile(folder, args.n) if args.stage == "profile"
                  else stage_liftir(folder, args.n, args.workers))
        result["peak_rss_mb"] = peak_rss_mb()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = resource.getrusage(resource.RUSAGE_SELF)
        result["peak_rss_worker_mb"] = children.ru_maxrss / 1024
        # CPU seconds of this process and its (finished) workers: the fair measure on a
        # machine shared with other jobs, where wall-clock time depends on their load
        result["cpu_seconds"] = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
        print(json.dumps(result))
        return

    from liftir.genome.synthetic import make_genome
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_bpnet(folder)
        counts = sorted({args.regions // 2, args.regions, args.tangermeme_regions})
        size = 400 + 300 * (max(counts) + 10) // 2 + 400
        fasta, bed = make_genome(folder, n_peaks=max(counts) + 3, seed=0, edge_peaks=3,
                                 chromosomes={"chr1": size + 3000, "chr2": size + 3000, "chrM": 1000})
        lines = bed.read_text().splitlines()[:-3]
        for n in counts:
            (folder / f"peaks_{n}.bed").write_text("\n".join(lines[:n]) + "\n")
        stages = [(f"liftir_1proc_{n}", ["--n", str(n)]) for n in (args.regions // 2, args.regions)]
        stages.append(("liftir_2workers", ["--n", str(args.regions), "--workers", "2"]))
        try:
            import tangermeme  # noqa: F401
            stages.append(("tangermeme", ["--n", str(args.tangermeme_regions), "--stage", "tangermeme"]))
        except ImportError:
            print("tangermeme is not installed: its column is skipped")
        if args.profile:
            stages.append(("liftir_profile", ["--n", str(args.regions), "--stage", "profile"]))
        results = {}
        for name, extra in stages:
            if args.only and args.only not in name:
                continue
            stage = next((e for e in ("tangermeme", "profile") if e in extra), "liftir")
            extra = [e for e in extra if e not in ("--stage", "tangermeme", "profile")]
            r = run_stage(["--stage", stage, "--folder", tmp, *extra])
            if r is not None:
                results[name] = r
                report(name, r)
                for label, (wall, cpu) in r.get("stages", {}).items():
                    print(f"    {label:38s} wall {wall / r['regions']:7.4f} s/region  "
                          f"CPU {cpu / r['regions']:7.4f} s/region", flush=True)
                if "tasks" in r:
                    rest = [r["seconds"] - r["tasks"][0], r["cpu_seconds"] - r["tasks"][1]]
                    print(f"    {'driver, start-up (outside tasks)':38s} wall {rest[0] / r['regions']:7.4f} "
                          f"s/region  CPU {rest[1] / r['regions']:7.4f} s/region", flush=True)
        ratios = []
        for i in range(args.rounds if "tangermeme" in results or args.only is None else 0):
            pair = {}
            for name, stage in (("liftir", "liftir"), ("tangermeme", "tangermeme")):
                n = args.regions // 2 if name == "liftir" else args.tangermeme_regions
                pair[name] = run_stage(["--stage", stage, "--folder", tmp, "--n", str(n)])
            if None in pair.values():
                continue
            # seconds of the work itself (explain_genome, including its explainer build and
            # store set-up; deep_lift_shap), without the processes' imports
            per = {k: (r["seconds"] / r["regions"], r["cpu_work_seconds"] / r["regions"])
                   for k, r in pair.items()}
            ratio = (per["liftir"][0] / per["tangermeme"][0], per["liftir"][1] / per["tangermeme"][1])
            ratios.append(ratio)
            print(f"round {i + 1}: liftir {per['liftir'][0]:.2f} s/region (CPU {per['liftir'][1]:.2f}), "
                  f"tangermeme {per['tangermeme'][0]:.2f} s/region (CPU {per['tangermeme'][1]:.2f}): "
                  f"{ratio[0]:.2f}x wall, {ratio[1]:.2f}x CPU", flush=True)
            results[f"round_{i + 1}"] = pair
        if ratios:
            wall, cpu = np.median(np.array(ratios), axis=0)
            print(f"median over {len(ratios)} rounds: liftir takes {wall:.2f}x tangermeme's wall time, "
                  f"{cpu:.2f}x its CPU time", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
