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

    python benchmarks/bench_genome.py --regions 100 --tangermeme-regions 10

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
    out = folder / f"scores_{n}_{workers}.zarr"
    started = time.perf_counter()
    summary = explain_genome(folder / "bpnet.onnx", fasta=folder / "genome.fa",
                             bed=folder / f"peaks_{n}.bed", width=WIDTH, shuffles=SHUFFLES, seed=0,
                             out=out, workers=workers, progress=False, chunk_size=32)
    seconds = time.perf_counter() - started
    return {"regions": summary.regions, "seconds": seconds, "max_abs_delta": summary.max_abs_delta}


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
    started = time.perf_counter()
    deep_lift_shap(model, xt, references=rt, hypothetical=True, batch_size=32, warning_threshold=1e9)
    return {"regions": len(x), "seconds": time.perf_counter() - started}


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
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        folder = Path(args.folder)
        result = (stage_tangermeme(folder, args.n) if args.stage == "tangermeme"
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
        results = {}
        for name, extra in stages:
            if args.only and args.only not in name:
                continue
            stage = "tangermeme" if "tangermeme" in extra else "liftir"
            extra = [e for e in extra if e not in ("--stage", "tangermeme")]
            r = run_stage(["--stage", stage, "--folder", tmp, *extra])
            if r is not None:
                results[name] = r
                report(name, r)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
