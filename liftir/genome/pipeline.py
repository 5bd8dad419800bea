"""The driver: explain every region of a genome-scale job, chunk by chunk, resumably.

Work is cut into tasks of whole store chunks. A task reads its sequences, draws its
references, runs DeepLIFT-SHAP and writes its chunks to the store, all inside the
process that runs it: in this process, or on Dask workers (a `LocalCluster` started
here, or any cluster given by its scheduler address). Each process builds its
Explainer once and reuses it. Dask reruns the tasks of a worker that dies; since a
region's result depends only on the region, its seed and the fixed batching inside
its store chunk, the store is byte-identical whatever the task size, the worker count
or the history of interruptions.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import InputError
from ..methods import Engine, Reference, get_method
from . import store
from .attribution import shap_scores
from .references import ReferenceSpec, load_reference_file, make_references
from .regions import Regions, read_bed
from .sequences import ArraySource, FastaSource

METHODS = ("deeplift_shap", "deeplift")
DEFAULT_STORE_CHUNK = 32
DEFAULT_MAX_MEMORY = 2 << 30


@dataclass
class Job:
    """Everything a task needs, small and picklable: paths, options, never arrays of data."""
    model: str
    model_sha256: str
    source: FastaSource | ArraySource
    out: str
    references: ReferenceSpec
    store_chunk: int
    batch: int
    channels_first: bool
    target: int | None = None
    output: str | None = None
    backend: str = "numpy"
    max_rule: str = "cross_max"
    user_references: np.ndarray | None = None
    engine: str = "compiled"


@dataclass
class Summary:
    regions: int
    skipped: int
    skipped_lines: list[int]
    non_acgt_bases: int
    soft_masked_bases: int
    max_abs_delta: float
    seconds: float
    chunks_computed: int
    chunks_resumed: int
    out: str
    extra: dict = field(default_factory=dict)

    @property
    def regions_per_second(self) -> float:
        return self.regions / self.seconds if self.seconds > 0 else float("inf")

    def text(self) -> str:
        return (f"{self.regions} regions explained ({self.chunks_resumed} chunks resumed, "
                f"{self.chunks_computed} computed), {self.skipped} skipped off chromosome ends, "
                f"{self.non_acgt_bases} non-ACGT bases (zero columns), {self.soft_masked_bases} "
                f"soft-masked bases; max |delta| {self.max_abs_delta:.3g}; "
                f"{self.seconds:.1f} s ({self.regions_per_second:.1f} regions/s) -> {self.out}")


# ---- per-process state (one Explainer per worker) ----------------------------------------

_STATE: dict[tuple, Any] = {}


def _explainer(job: Job):
    key = ("explainer", job.model_sha256, job.backend, job.max_rule, job.engine)
    if key not in _STATE:
        from ..explainer import Explainer
        data = Path(job.model).read_bytes()
        if hashlib.sha256(data).hexdigest() != job.model_sha256:
            raise InputError(f"{job.model} changed since the run started (sha256 differs)")
        _STATE[key] = Explainer(data, method="deeplift_shap", backend=job.backend,
                                max_rule=job.max_rule, engine=job.engine)
    return _STATE[key]


def _source(job: Job):
    key = ("source", type(job.source).__name__, job.source.path)
    if key not in _STATE:
        _STATE[key] = job.source
    return _STATE[key]


def run_task(job: Job, regions: Regions, chunks: list[int]) -> list[int]:
    """Compute and write the given store chunks (`regions` are exactly their rows)."""
    explainer = _explainer(job)
    source = _source(job)
    offset = chunks[0] * job.store_chunk
    for chunk in chunks:
        lo = chunk * job.store_chunk - offset
        part = regions.subset(lo, min(lo + job.store_chunk, len(regions)))
        onehot, non_acgt, masked = source.fetch(part)
        actual = np.empty_like(onehot)
        hypothetical = np.empty_like(onehot)
        delta = np.empty(len(part), np.float64)
        for b in range(0, len(part), job.batch):  # fixed batches inside the chunk: same numerics
            sl = slice(b, b + job.batch)
            refs = make_references(job.references, onehot[sl], part.index[sl], job.user_references)
            actual[sl], hypothetical[sl], delta[sl] = shap_scores(
                explainer, onehot[sl], refs, job.channels_first, job.target, job.output)
        store.write_chunk(job.out, chunk, job.store_chunk, onehot, actual, hypothetical, delta,
                          non_acgt, masked)
    return chunks


# ---- planning ----------------------------------------------------------------------------------

def parse_memory(value) -> int:
    """Bytes from an int or a string such as '2GB', '512MiB', '1.5G'."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value <= 0:
            raise InputError(f"max_memory must be positive, got {value}")
        return int(value)
    text = str(value).strip().upper().replace("IB", "B")
    units = {"TB": 1 << 40, "GB": 1 << 30, "MB": 1 << 20, "KB": 1 << 10, "T": 1 << 40,
             "G": 1 << 30, "M": 1 << 20, "K": 1 << 10, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                number = float(text[: -len(unit)])
            except ValueError:
                break
            if number > 0:
                return int(number * factor)
            break
    raise InputError(f"max_memory must be a size such as '2GB' or '512MB', got {value!r}")


def _model_layout(explainer, width: int) -> bool:
    """True when the model takes (N, 4, L), False for (N, L, 4)."""
    if len(explainer.inputs) != 1:
        raise InputError(f"the genome pipeline explains one-input models; this one has "
                         f"{len(explainer.inputs)} inputs {explainer.input_names}")
    shape = explainer.inputs[0].shape
    if shape is None or len(shape) != 3:
        raise InputError(f"the model input must be (N, 4, L) or (N, L, 4), got {shape}")
    _, a, b = shape
    if a == 4 and b in (width, None) or (isinstance(b, str) and a == 4):
        return True
    if b == 4 and (a in (width, None) or isinstance(a, str)):
        return False
    raise InputError(f"the model input {explainer.input_names[0]!r} has shape {shape}; "
                     f"regions of width {width} need (N, 4, {width}) or (N, {width}, 4)")


def _batch_for_budget(explainer, job_refs: int, width: int, channels_first: bool, budget: int,
                      target, output) -> int:
    """Regions per forward/backward pass so one worker stays within `budget` bytes.

    One probe region (with `job_refs` references) goes through the Explainer's public
    `pair_multipliers` with no budget; the Explainer's own estimate of that pass
    (`last_pass.estimate`: activations kept for the backward, the pairs' expanded copies,
    multipliers in flight) is what a region costs, measured the way `attribute` sizes
    its passes.
    """
    shape = (1, 4, width) if channels_first else (1, width, 4)
    x = np.zeros(shape, np.float32)
    x[(0, 0, slice(None)) if channels_first else (0, slice(None), 0)] = 1
    refs = np.zeros((1, job_refs) + shape[1:], np.float32)
    explainer.pair_multipliers(x, refs, target, output=output, max_memory=None)
    per_region = explainer.last_pass.estimate + 6 * job_refs * width * 4 * 4  # + refs, m, scores
    return max(1, int(budget // max(per_region, 1)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- the driver -------------------------------------------------------------------------------

def explain_genome(model, *, out: str, fasta: str | None = None, bed: str | None = None,
                   sequences: str | None = None, key: str | None = None, width: int | None = None,
                   method: str = "deeplift_shap", references: str = "shuffle", shuffles: int = 20,
                   seed: int = 0, gc: float = 0.41, reference_file: str | None = None,
                   target: int | None = None, output: str | None = None, edge: str = "skip",
                   chunk_size: int | None = None, store_chunk: int = DEFAULT_STORE_CHUNK,
                   max_memory=DEFAULT_MAX_MEMORY, workers: int = 0, scheduler: str | None = None,
                   backend: str = "numpy", max_rule: str = "cross_max", engine: str = "compiled",
                   progress: bool = True, modisco_out: str | None = None,
                   on_task_done: Callable[[int, int], None] | None = None) -> Summary:
    """DeepLIFT-SHAP scores of every region of a BED on a FASTA (or of one-hot arrays),
    streamed to a Zarr store; rerun the same call to resume an interrupted run.

    Parameters
    ----------
    model : path of the ONNX model, input (N, 4, L) or (N, L, 4), one output explained
        (``output=`` names a tensor, ``target=`` an index into an (N, C) output).
    out : the Zarr store to write (see liftir.genome.store for its layout).
    fasta, bed : the genome (indexed random access through pyfaidx) and the regions
        (BED or narrowPeak; narrowPeak summits centre the windows). Or ``sequences``:
        one-hot arrays in a .npy / .npz / .h5 / .zarr (``key`` names the array).
    width : window width (required with ``bed``; taken from the arrays otherwise).
    method : "deeplift_shap" (default) or "deeplift" (one reference).
    references : "shuffle" (``shuffles`` dinucleotide shuffles per region, drawn from the
        seed (``seed``, region index)), "zeros", "gc" (fixed background of GC fraction
        ``gc``) or "file" (``reference_file``, (S, L, 4) shared by all regions).
    edge : windows off a chromosome end are "skip"ped (default, reported) or "pad"ded with N.
    chunk_size : regions per task (rounded up to whole store chunks); default 4 store chunks.
    store_chunk : regions per chunk of the store (fixes the store's bytes; default 32).
    max_memory : memory budget of one worker ("2GB" default): it sets how many regions go
        through one forward/backward pass.
    workers : 0 (default) runs here; N > 0 starts a Dask LocalCluster of N worker
        processes. ``scheduler`` : address of an existing Dask cluster instead.
    backend : "numpy", "cupy" or "auto" (each worker uses its GPU when it has one).
    engine : "compiled" (default: each pass one onnxruntime session, compiled once per
        worker and pass shape) or "interpreter" (the rules op by op; CuPy always). Part of
        the run's identity: a store is resumed with the engine it was started with.
    modisco_out : also write TF-MoDISco's ohe.npz / shap.npz into this folder.
    on_task_done : called as f(regions_done, regions_total) after each task (tests, GUIs).

    Returns a Summary (also stored, without timings, in the store's attrs).
    """
    started = time.perf_counter()
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(store_chunk, int) or store_chunk < 1:
        raise InputError(f"store_chunk must be a positive int, got {store_chunk!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise InputError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if workers and scheduler:
        raise InputError("pass either workers (a local cluster) or scheduler (an existing one)")
    if not isinstance(workers, int) or workers < 0:
        raise InputError(f"workers must be an int >= 0, got {workers!r}")
    budget = parse_memory(max_memory)
    spec = ReferenceSpec(kind=references, n=shuffles if references == "shuffle" else 1,
                         seed=seed, gc=gc, path=reference_file)
    model_path = Path(model)
    if not model_path.is_file():
        raise InputError(f"model file {str(model)!r} does not exist")
    sha = _sha256(model_path)

    if sequences is not None:
        if fasta is not None or bed is not None:
            raise InputError("pass either sequences (one-hot arrays) or fasta and bed")
        source = ArraySource(str(sequences), key)
        regions = source.regions()
        width_found = int(regions.end[0])
        if width is not None and width != width_found:
            raise InputError(f"width {width} does not match the sequences' length {width_found}")
        width = width_found
        inputs = {"sequences": Path(sequences).name, "sequences_sha256": _sha256(Path(sequences))
                  if Path(sequences).is_file() else None, "key": key}
    else:
        if fasta is None or bed is None:
            raise InputError("pass fasta and bed (or sequences=one-hot arrays)")
        if width is None:
            raise InputError("width is required with a BED file")
        source = FastaSource(str(fasta))
        sizes = source.chrom_sizes()
        regions = read_bed(bed, width, sizes, edge)
        if len(regions) == 0:
            raise InputError(f"every region of {bed} falls off a chromosome end at width {width}")
        inputs = {"fasta": Path(fasta).name,
                  "fasta_chromosomes_sha256": hashlib.sha256(json.dumps(sizes).encode()).hexdigest(),
                  "bed": Path(bed).name, "bed_sha256": _sha256(Path(bed)), "edge": edge}

    user_refs = load_reference_file(reference_file, width) if references == "file" else None
    n_refs = spec.n if references != "file" else len(user_refs)
    if get_method(method).reference is Reference.ONE and n_refs != 1:
        raise InputError(f"method {method!r} takes one reference per region; {references!r} "
                         f"gives {n_refs} (use deeplift_shap)")
    from ..explainer import Explainer
    engine = Engine.parse(engine, "engine").value  # a string: the store's config records it
    probe = Explainer(model_path.read_bytes(), method="deeplift_shap", max_rule=max_rule, engine=engine)
    channels_first = _model_layout(probe, width)
    if backend == "numpy":  # tasks run in this process reuse it
        _STATE.setdefault(("explainer", sha, backend, max_rule, engine), probe)

    from .. import __version__
    config = {"format": "liftir-genome-1", "liftir_version": __version__, "model": model_path.name,
              "model_sha256": sha, "method": method, "references": spec.describe(),
              "width": int(width), "target": target, "output": output, "max_rule": max_rule,
              "engine": engine,
              "regions": len(regions), "store_chunk": store_chunk, "layout": "N,L,ACGT",
              "model_layout": "N,4,L" if channels_first else "N,L,4", **inputs}
    if user_refs is not None:
        config["references"]["sha256"] = hashlib.sha256(user_refs.tobytes()).hexdigest()
    out = str(out)
    existed = Path(out).exists()
    batch = _batch_for_budget(probe, n_refs, width, channels_first, budget, target, output)
    store.create_or_resume(out, config, regions, width, store_chunk)
    batch = _stored_batch(out, min(batch, store_chunk))
    job = Job(str(model_path.resolve()), sha, source, str(Path(out).resolve()), spec, store_chunk,
              batch, channels_first, target, output, backend, max_rule, user_refs, engine)

    n_chunks = -(-len(regions) // store_chunk)
    done = store.done_chunks(out) if existed else np.zeros(n_chunks, bool)
    per_task = max(1, -(-(chunk_size or 4 * store_chunk) // store_chunk))
    todo = [c for c in range(n_chunks) if not done[c]]
    tasks = [todo[i:i + per_task] for i in range(0, len(todo), per_task)]
    already = int(sum(min(store_chunk, len(regions) - c * store_chunk) for c in range(n_chunks) if done[c]))
    bar = _progress(progress, len(regions), already)
    finished = already

    def task_done(chunks: list[int]) -> None:
        nonlocal finished
        n = sum(min(store_chunk, len(regions) - c * store_chunk) for c in chunks)
        finished += n
        if bar is not None:
            bar.update(n)
        if on_task_done is not None:
            on_task_done(finished, len(regions))

    def rows(chunks):
        lo = chunks[0] * store_chunk
        return regions.subset(lo, min((chunks[-1] + 1) * store_chunk, len(regions)))

    try:
        if tasks and (workers or scheduler):
            from .dask_driver import run_on_dask
            run_on_dask(job, [(rows(t), t) for t in tasks], workers, scheduler, task_done)
        else:
            for t in tasks:
                task_done(run_task(job, rows(t), t))
    finally:
        if bar is not None:
            bar.close()
    summary = _summarize(out, regions, len(todo),
                         n_chunks - len(todo), time.perf_counter() - started)
    if modisco_out:
        store.export_modisco(out, modisco_out)
    return summary


def _stored_batch(out: str, batch: int) -> int:
    """The batch a store was started with (resumes keep it: it fixes the numerics)."""
    import zarr
    group = zarr.open_group(out, mode="r+")
    stored = group.attrs.get("batch")
    if stored is None:
        group.attrs["batch"] = int(batch)
        return int(batch)
    return int(stored)


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, unit="region", desc="liftir genome", smoothing=0.1)


def _summarize(out: str, regions: Regions, computed: int, resumed: int, seconds: float) -> Summary:
    import zarr
    group = zarr.open_group(out, mode="r")
    if not bool(np.all(group["chunk_done"][:] == 1)):
        raise InputError(f"{out}: some chunks were not written; rerun the same command")
    delta = group["delta"][:]
    summary = Summary(regions=len(regions), skipped=len(regions.skipped_lines),
                      skipped_lines=list(regions.skipped_lines),
                      non_acgt_bases=int(group["chunk_non_acgt"][:].sum()),
                      soft_masked_bases=int(group["chunk_soft_masked"][:].sum()),
                      max_abs_delta=float(np.abs(delta).max()) if len(delta) else 0.0,
                      seconds=seconds, chunks_computed=int(computed), chunks_resumed=int(resumed),
                      out=out)
    store.finish(out, {"regions": summary.regions, "skipped": summary.skipped,
                       "non_acgt_bases": summary.non_acgt_bases,
                       "soft_masked_bases": summary.soft_masked_bases,
                       "max_abs_delta": summary.max_abs_delta})
    return summary
