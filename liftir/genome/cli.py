"""The `liftir genome` subcommand: its options, and the call into the pipeline.

Kept apart from liftir/cli.py, which only registers it (`add_parser`), so the command's
options live next to the pipeline they drive.
"""
from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  liftir genome model.onnx --fasta hg38.fa --bed peaks.narrowPeak --width 2114 \\
      --method deeplift_shap --shuffles 20 --seed 0 --out scores.zarr
  liftir genome model.onnx --fasta hg38.fa --bed peaks.bed --width 2114 --workers 4 --out scores.zarr
  liftir genome model.onnx --fasta hg38.fa --bed peaks.bed --width 2114 \\
      --scheduler tcp://head:8786 --out /shared/scores.zarr        # an existing Dask cluster
  liftir genome model.onnx --sequences onehot.npy --references zeros --method deeplift --out s.zarr
  liftir genome model.onnx ... --out scores.zarr --modisco-out modisco/
  modisco motifs -s modisco/ohe.npz -a modisco/shap.npz -n 2000 -o modisco_results.h5

Rerunning the same command after an interruption resumes from the chunks written.
The store holds onehot, contributions, hypothetical (N, L, 4), delta (N,), regions/*;
`liftir genome-export STORE DIR` writes TF-MoDISco's inputs from a finished store.
"""


def add_parser(sub, positive_int, formatter) -> None:
    """Register `genome` and `genome-export` on the `liftir` command's subparsers."""
    p = sub.add_parser("genome", formatter_class=formatter, epilog=EPILOG,
                       help="explain every region of a BED on a FASTA into a Zarr store",
                       description="DeepLIFT-SHAP over the regions of a BED/narrowPeak file on a "
                                   "FASTA genome (or over one-hot arrays), streamed to a chunked "
                                   "Zarr store, resumable and distributable with Dask.")
    p.add_argument("model", metavar="MODEL", help="ONNX model, input (N, 4, L) or (N, L, 4)")
    p.add_argument("--fasta", metavar="FILE", help="genome FASTA (indexed with pyfaidx)")
    p.add_argument("--bed", metavar="FILE", help="regions: BED or narrowPeak (summit-centred)")
    p.add_argument("--sequences", metavar="FILE", help="or one-hot arrays: .npy/.npz/.h5/.zarr")
    p.add_argument("--key", metavar="NAME", default=None, help="array name inside --sequences")
    p.add_argument("--width", type=positive_int, default=None, metavar="BP", help="window width")
    p.add_argument("--method", choices=["deeplift_shap", "deeplift"], default="deeplift_shap")
    p.add_argument("--references", choices=["shuffle", "zeros", "gc", "file"], default="shuffle",
                   help="dinucleotide shuffles (default), all zeros, a GC background, or a file")
    p.add_argument("--shuffles", type=positive_int, default=20, metavar="S",
                   help="shuffles per region (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffles (default: 0)")
    p.add_argument("--gc", type=float, default=0.41, help="GC fraction of --references gc")
    p.add_argument("--reference-file", metavar="FILE.npy", default=None,
                   help="(S, L, 4) references shared by all regions, for --references file")
    p.add_argument("--target", type=int, default=None, help="index into an (N, C) output")
    p.add_argument("--output", metavar="TENSOR", default=None, help="tensor to explain")
    p.add_argument("--edge", choices=["skip", "pad"], default="skip",
                   help="windows off a chromosome end: skip (default, reported) or pad with N")
    p.add_argument("--chunk-size", type=positive_int, default=None, metavar="N",
                   help="regions per task (default: 4 store chunks)")
    p.add_argument("--store-chunk", type=positive_int, default=32, metavar="N",
                   help="regions per chunk of the store (default: 32)")
    p.add_argument("--max-memory", default="2GB", metavar="SIZE",
                   help="memory budget per worker (default: 2GB)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="start a Dask LocalCluster of N workers (default: 0, run here)")
    p.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="use an existing Dask cluster (e.g. tcp://host:8786)")
    p.add_argument("--backend", choices=["numpy", "cupy", "auto"], default="numpy",
                   help="auto: each worker uses its GPU when it has one")
    p.add_argument("--max-rule", choices=["cross_max", "paper"], default="cross_max")
    p.add_argument("--engine", choices=["compiled", "interpreter"], default="compiled",
                   help="compiled (default): each pass one onnxruntime session; interpreter: the "
                        "rules op by op")
    p.add_argument("--out", "-o", required=True, metavar="STORE.zarr", help="the Zarr store")
    p.add_argument("--modisco-out", metavar="DIR", default=None,
                   help="also write TF-MoDISco's ohe.npz and shap.npz into DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_genome)

    p = sub.add_parser("genome-export", formatter_class=formatter,
                       help="write TF-MoDISco's ohe.npz / shap.npz from a genome store",
                       description="Write ohe.npz and shap.npz ((N, 4, L) float32, hypothetical "
                                   "contributions) for `modisco motifs` from a finished store.")
    p.add_argument("store", metavar="STORE.zarr")
    p.add_argument("out_dir", metavar="DIR")
    p.set_defaults(func=cmd_export)


def cmd_genome(args: argparse.Namespace) -> int:
    from .pipeline import explain_genome
    try:
        summary = _run(explain_genome, args)
    except OSError as exc:  # a full disk, a lost mount: what is written stays valid
        print(f"liftir: error: {exc}; chunks already written are kept: fix the cause and rerun "
              f"the same command to resume", file=sys.stderr)
        return 2
    print(summary.text(), file=sys.stderr)
    if summary.skipped:
        shown = ", ".join(map(str, summary.skipped_lines[:10]))
        more = " ..." if summary.skipped > 10 else ""
        print(f"skipped BED lines (window off a chromosome end): {shown}{more}", file=sys.stderr)
    return 0


def _run(explain_genome, args: argparse.Namespace):
    return explain_genome(
        args.model, out=args.out, fasta=args.fasta, bed=args.bed, sequences=args.sequences,
        key=args.key, width=args.width, method=args.method, references=args.references,
        shuffles=args.shuffles, seed=args.seed, gc=args.gc, reference_file=args.reference_file,
        target=args.target, output=args.output, edge=args.edge, chunk_size=args.chunk_size,
        store_chunk=args.store_chunk, max_memory=args.max_memory, workers=args.workers,
        scheduler=args.scheduler, backend=args.backend, max_rule=args.max_rule, engine=args.engine,
        progress=not args.no_progress, modisco_out=args.modisco_out)


def cmd_export(args: argparse.Namespace) -> int:
    from .store import export_modisco
    ohe, shap = export_modisco(args.store, args.out_dir)
    print(f"wrote {ohe} and {shap}; next: modisco motifs -s {ohe} -a {shap} -n 2000 "
          f"-o modisco_results.h5", file=sys.stderr)
    return 0
