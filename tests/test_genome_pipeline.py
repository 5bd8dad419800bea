"""The genome pipeline on a synthetic genome and the shipped small GATA/TAL1 model.

One reference store is computed in-process; every other way of running the same job
(the CLI, other chunk sizes, Dask workers, a worker killed mid-run, the whole run killed
and restarted, a Ctrl-C and a torn chunk) must give a byte-identical store.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("zarr")
pytest.importorskip("pyfaidx")

import zarr  # noqa: E402

from liftir import Explainer  # noqa: E402
from liftir.errors import InputError  # noqa: E402
from liftir.genome import explain_genome, export_modisco, open_store  # noqa: E402
from liftir.genome.regions import read_bed  # noqa: E402
from liftir.genome.sequences import FastaSource  # noqa: E402
from liftir.genome.synthetic import make_genome  # noqa: E402
from liftir.genomics import hypothetical_contributions  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "liftir" / "data" / "genome_gata_tal1.onnx"
WIDTH = 200
SHUFFLES = 4
OPTIONS = dict(width=WIDTH, shuffles=SHUFFLES, seed=0, store_chunk=8, progress=False)


@pytest.fixture(scope="module")
def genome(tmp_path_factory):
    return make_genome(tmp_path_factory.mktemp("genome"), n_peaks=200, seed=0)


@pytest.fixture(scope="module")
def reference_store(genome, tmp_path_factory):
    fasta, bed = genome
    out = tmp_path_factory.mktemp("ref") / "scores.zarr"
    summary = explain_genome(MODEL, fasta=fasta, bed=bed, out=out, chunk_size=16, **OPTIONS)
    return out, summary


def tree(path: Path) -> dict[str, bytes]:
    """Every file of a store, by relative path: for byte-identity checks."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_identical(a: Path, b: Path) -> None:
    ta, tb = tree(a), tree(b)
    assert sorted(ta) == sorted(tb)
    different = [k for k in ta if ta[k] != tb[k]]
    assert not different, different[:5]


# ---- regions and sequences ---------------------------------------------------------------------

def test_bed_windows_are_centred_on_summits_and_edges_are_skipped(genome):
    fasta, bed = genome
    sizes = FastaSource(str(fasta)).chrom_sizes()
    regions = read_bed(bed, WIDTH, sizes)
    lines = bed.read_text().splitlines()
    assert len(regions) + len(regions.skipped_lines) == len(lines) == 200
    assert len(regions.skipped_lines) == 3  # the synthetic genome's three edge peaks
    first = lines[0].split("\t")
    summit = int(first[1]) + int(first[9])
    assert regions.start[0] == summit - WIDTH // 2 and regions.end[0] - regions.start[0] == WIDTH
    padded = read_bed(bed, WIDTH, sizes, edge="pad")
    assert len(padded) == 200 and padded.start.min() < 0


@pytest.mark.parametrize("content, message", [
    ("chrX\t10\t50\n", "line 1: chromosome 'chrX' is not in the FASTA"),
    ("chr1\t10\t50\nchrM\t900\t1200\n", "line 2: region chrM:900-1200 extends past the end"),
    ("", "has no regions"),
    ("# only a header\n", "has no regions"),
    ("chr1\t10\n", "line 1: a BED line needs at least 3 tab-separated columns"),
    ("chr1 10 50\n", "line 1: a BED line needs at least 3"),
    ("chr1\tten\t50\n", "line 1: start and end must be integers"),
    ("chr1\t50\t10\n", "line 1: need 0 <= start < end"),
    ("track name=x\nchr1\t10\t50\tp\t0\t.\t1\t1\t1\t99\n", "line 2: summit offset 99 lies outside"),
])
def test_bad_bed_files_name_the_line_and_leave_no_store(genome, tmp_path, content, message):
    fasta, _ = genome
    bed = tmp_path / "bad.bed"
    bed.write_text(content)
    out = tmp_path / "never.zarr"
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("*", r"\*")):
        explain_genome(MODEL, fasta=fasta, bed=bed, out=out, **OPTIONS)
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_bad_fasta_files_are_clear_errors(genome, tmp_path):
    _, bed = genome
    empty = tmp_path / "empty.fa"
    empty.write_text("")
    with pytest.raises(InputError, match="empty"):
        explain_genome(MODEL, fasta=empty, bed=bed, out=tmp_path / "x.zarr", **OPTIONS)
    with pytest.raises(InputError, match="does not exist"):
        explain_genome(MODEL, fasta=tmp_path / "missing.fa", bed=bed, out=tmp_path / "x.zarr", **OPTIONS)
    assert not (tmp_path / "x.zarr").exists()


def test_fasta_reads_n_as_zero_columns_and_soft_masked_as_bases(tmp_path):
    fasta = tmp_path / "tiny.fa"
    fasta.write_text(">c\nACGTNacgtn\nAC\n")
    bed = tmp_path / "tiny.bed"
    bed.write_text("c\t0\t12\n")
    source = FastaSource(str(fasta))
    regions = read_bed(bed, 12, source.chrom_sizes())
    onehot, non_acgt, masked = source.fetch(regions)
    np.testing.assert_array_equal(onehot[0].argmax(1)[:4], [0, 1, 2, 3])
    np.testing.assert_array_equal(onehot[0, 5:9], onehot[0, 0:4])  # lower case = upper case
    assert onehot[0, 4].sum() == 0 and onehot[0, 9].sum() == 0
    assert (non_acgt, masked) == (2, 5)


# ---- the reference store ---------------------------------------------------------------------

def test_store_contents_summation_to_delta_and_agreement_with_the_explainer(genome, reference_store):
    out, summary = reference_store
    group = open_store(out)
    n = 197
    assert summary.regions == n and summary.skipped == 3 and summary.non_acgt_bases > 0
    assert summary.soft_masked_bases > 0
    x = group["onehot"][:].astype(np.float32)
    actual, hyp, delta = group["contributions"][:], group["hypothetical"][:], group["delta"][:]
    assert x.shape == actual.shape == hyp.shape == (n, WIDTH, 4) and delta.shape == (n,)
    # summation-to-delta for every region, and the stored summary reports it
    assert np.abs(delta).max() < 1e-3
    assert group.attrs["summary"]["max_abs_delta"] == pytest.approx(np.abs(delta).max())
    # sum over bases of the actual scores = hypothetical scores at the present base
    # (where a base is present: an N column has no base, and its shuffles may have one)
    known = x.sum(-1) == 1
    assert (~known).sum() > 0
    np.testing.assert_allclose(actual.sum(-1)[known], (hyp * x).sum(-1)[known], atol=1e-5)
    meta = group.attrs["liftir"]
    assert meta["method"] == "deeplift_shap" and meta["references"] == {
        "kind": "shuffle", "shuffles": SHUFFLES, "seed": 0}
    assert len(meta["model_sha256"]) == 64 and meta["liftir_version"] and meta["engine"] == "compiled"

    # The first regions again, through the public Explainer on the same shuffles: the
    # actual scores agree, and the hypothetical ones equal hypothetical_contributions of
    # per-pair multipliers computed by the Explainer's own attribute path.
    from liftir.genome.references import ReferenceSpec, make_references
    k = 5
    index = group["regions/index"][:k]
    refs = make_references(ReferenceSpec(n=SHUFFLES, seed=0), x[:k], index)  # (k, S, L, 4)
    ex = Explainer(str(MODEL), method="deeplift_shap")
    want = ex.attribute(x[:k].transpose(0, 2, 1), refs.transpose(0, 1, 3, 2)).transpose(0, 2, 1)
    np.testing.assert_allclose(actual[:k], want, atol=1e-5)
    plain = Explainer(str(MODEL), method="deeplift")
    rows = np.repeat(x[:k], SHUFFLES, axis=0).transpose(0, 2, 1)
    m = plain.attribute(rows, refs.reshape(-1, WIDTH, 4).transpose(0, 2, 1),
                        multiply_by_inputs=False).transpose(0, 2, 1)  # the multipliers
    np.testing.assert_allclose(hyp[:k], hypothetical_contributions(m.reshape(refs.shape), refs),
                               atol=1e-5)
    # the regions are the kept BED lines, in order
    assert list(group["regions/line"][:3]) == [1, 2, 3]
    assert group.attrs["skipped_lines"] == [198, 199, 200]


def test_cli_with_another_chunk_size_writes_the_same_bytes(genome, reference_store, tmp_path):
    from liftir.cli import main
    fasta, bed = genome
    out = tmp_path / "cli.zarr"
    code = main(["genome", str(MODEL), "--fasta", str(fasta), "--bed", str(bed), "--width", str(WIDTH),
                 "--shuffles", str(SHUFFLES), "--seed", "0", "--store-chunk", "8", "--chunk-size", "40",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    assert_identical(reference_store[0], out)
    # the same command again: nothing to do, same bytes; another seed: a clear refusal
    assert main(["genome", str(MODEL), "--fasta", str(fasta), "--bed", str(bed), "--width", str(WIDTH),
                 "--shuffles", str(SHUFFLES), "--store-chunk", "8", "--out", str(out), "--no-progress"]) == 0
    assert_identical(reference_store[0], out)
    with pytest.raises(InputError, match="differs in: references"):
        explain_genome(MODEL, fasta=fasta, bed=bed, out=out, **{**OPTIONS, "seed": 1})
    # the engine is part of the run: its chunks are not mixed with another engine's
    with pytest.raises(InputError, match="differs in: engine"):
        explain_genome(MODEL, fasta=fasta, bed=bed, out=out, engine="interpreter", **OPTIONS)


def test_interrupted_and_torn_runs_resume_to_the_same_bytes(genome, reference_store, tmp_path):
    fasta, bed = genome
    out = tmp_path / "resumed.zarr"

    def stop_after_two(done, total):
        if done >= 16:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        explain_genome(MODEL, fasta=fasta, bed=bed, out=out, chunk_size=8, on_task_done=stop_after_two,
                       **OPTIONS)
    with pytest.raises(InputError, match="incomplete"):
        open_store(out)
    # a chunk torn by a crash: data written, marker not; garbage must not survive
    group = zarr.open_group(str(out), mode="r+")
    assert list(group["chunk_done"][:3]) == [1, 1, 0]
    group["contributions"][16:24] = 7.0
    # and a write killed in flight: Zarr's temporary file, never renamed into place
    torn = out / "contributions" / "c" / "3" / "0" / f"0.{'ab' * 16}.partial"
    torn.parent.mkdir(parents=True, exist_ok=True)
    torn.write_bytes(b"torn")
    summary = explain_genome(MODEL, fasta=fasta, bed=bed, out=out, chunk_size=24, **OPTIONS)
    assert summary.chunks_resumed == 2
    assert_identical(reference_store[0], out)


def test_a_killed_process_resumes_to_the_same_bytes(genome, reference_store, tmp_path):
    fasta, bed = genome
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "liftir", "genome", str(MODEL), "--fasta", str(fasta), "--bed", str(bed),
           "--width", str(WIDTH), "--shuffles", str(SHUFFLES), "--store-chunk", "8", "--chunk-size", "8",
           "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = out / "chunk_done"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if marker.exists() and len([p for p in (marker / "c").rglob("*") if p.is_file()]) >= 2:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert_identical(reference_store[0], out)


def test_a_full_disk_is_a_clear_error_and_the_rerun_completes(genome, reference_store, tmp_path,
                                                              monkeypatch, capsys):
    import errno

    from liftir.cli import main
    from liftir.genome import store
    fasta, bed = genome
    out = tmp_path / "full.zarr"
    write = store.write_chunk
    calls = []

    def fill_up(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(*args, **kwargs)
    monkeypatch.setattr(store, "write_chunk", fill_up)
    argv = ["genome", str(MODEL), "--fasta", str(fasta), "--bed", str(bed), "--width", str(WIDTH),
            "--shuffles", str(SHUFFLES), "--store-chunk", "8", "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err
    monkeypatch.setattr(store, "write_chunk", write)
    assert main(argv) == 0
    assert_identical(reference_store[0], out)
    assert main(["genome-export", str(out), str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "shap.npz").is_file()


def test_import_liftir_needs_none_of_the_genome_dependencies():
    code = ("import sys, liftir, liftir.genomics, liftir.genome, liftir.cli; liftir.cli.build_parser(); "
            "print(sorted(m for m in ('zarr', 'dask', 'distributed', 'pyfaidx', 'h5py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- Dask ------------------------------------------------------------------------------------

def test_dask_workers_with_one_killed_mid_run_write_the_same_bytes(genome, reference_store, tmp_path):
    pytest.importorskip("distributed")
    psutil = pytest.importorskip("psutil")
    fasta, bed = genome
    out = tmp_path / "dask.zarr"
    killed = []

    def kill_a_worker(done, total):
        if killed:
            return
        workers = [p for p in psutil.Process().children(recursive=True)
                   if "spawn_main" in " ".join(p.cmdline())]
        assert workers, "no worker process found"
        workers[0].send_signal(signal.SIGKILL)
        killed.append(workers[0].pid)
    explain_genome(MODEL, fasta=fasta, bed=bed, out=out, chunk_size=8, workers=2,
                   on_task_done=kill_a_worker, **OPTIONS)
    assert killed
    assert_identical(reference_store[0], out)


def test_an_existing_cluster_by_scheduler_address(genome, reference_store, tmp_path):
    distributed = pytest.importorskip("distributed")
    fasta, bed = genome
    out = tmp_path / "scheduler.zarr"
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None,
                                  silence_logs=40) as cluster:
        explain_genome(MODEL, fasta=fasta, bed=bed, out=out, chunk_size=32,
                       scheduler=cluster.scheduler_address, **OPTIONS)
    assert_identical(reference_store[0], out)


# ---- other inputs and references ---------------------------------------------------------------

def test_one_hot_arrays_zero_and_gc_references(reference_store, tmp_path):
    group = open_store(reference_store[0])
    x = group["onehot"][:24].astype(np.float32)
    np.save(tmp_path / "x.npy", x.transpose(0, 2, 1))  # (N, 4, L) is read too
    ex = Explainer(str(MODEL), method="deeplift")
    for kind, ref in (("zeros", 0.0), ("gc", np.array([0.295, 0.205, 0.205, 0.295], np.float32))):
        out = tmp_path / f"{kind}.zarr"
        summary = explain_genome(MODEL, sequences=tmp_path / "x.npy", out=out, method="deeplift",
                                 references=kind, store_chunk=8, progress=False)
        assert summary.regions == 24 and summary.max_abs_delta < 1e-4
        base = np.broadcast_to(ref, x.shape).transpose(0, 2, 1)
        want, delta = ex.attribute(x.transpose(0, 2, 1), base, return_convergence_delta=True)
        got = open_store(out)["contributions"][:]
        np.testing.assert_allclose(got, want.transpose(0, 2, 1), atol=1e-5)
    with pytest.raises(InputError, match="one reference per region"):
        explain_genome(MODEL, sequences=tmp_path / "x.npy", out=tmp_path / "no.zarr", method="deeplift")


def test_modisco_export_is_what_modisco_reads(reference_store, tmp_path):
    ohe, shap = export_modisco(str(reference_store[0]), str(tmp_path / "modisco"))
    group = open_store(reference_store[0])
    x, h = np.load(ohe)["arr_0"], np.load(shap)["arr_0"]
    assert x.shape == h.shape == (197, 4, WIDTH) and x.dtype == h.dtype == np.float32
    np.testing.assert_array_equal(h, group["hypothetical"][:].transpose(0, 2, 1))


@pytest.mark.gpu
def test_gpu_backend_matches_numpy(reference_store, genome, tmp_path):
    from liftir.backend import _cupy_usable
    if _cupy_usable() is None:
        pytest.skip("needs CuPy and a usable CUDA GPU (pip install liftir[gpu])")
    fasta, bed = genome
    out = tmp_path / "gpu.zarr"
    explain_genome(MODEL, fasta=fasta, bed=bed, out=out, backend="cupy", **OPTIONS)
    a, b = open_store(reference_store[0]), open_store(out)
    np.testing.assert_allclose(a["contributions"][:], b["contributions"][:], atol=1e-5)
    assert np.abs(b["delta"][:]).max() < 1e-3


# ---- TF-MoDISco on the output --------------------------------------------------------------------

def _best_match(ppm: np.ndarray, motif: str) -> float:
    """Largest mean probability of `motif` (or its reverse complement) along a PPM (L, 4)."""
    best = 0.0
    for site in (motif, motif[::-1].translate(str.maketrans("ACGT", "TGCA"))):
        idx = np.array(["ACGT".index(c) for c in site])
        for s in range(len(ppm) - len(site) + 1):
            best = max(best, float(ppm[s + np.arange(len(site)), idx].mean()))
    return best


@pytest.mark.slow
@pytest.mark.modisco
def test_modisco_finds_the_implanted_gata_motif(genome, tmp_path):
    """`liftir genome --modisco-out` feeds `modisco motifs` (modisco-lite) as is, and the
    GATA site implanted at every summit is among its top patterns. Needs modisco-lite
    (numba & co., not a liftir dependency): skipped without it; about a minute."""
    pytest.importorskip("modiscolite")
    h5py = pytest.importorskip("h5py")
    import shutil
    modisco = shutil.which("modisco") or str(Path(sys.executable).with_name("modisco"))
    if not Path(modisco).exists():
        pytest.skip("the modisco command is not installed")
    from liftir.cli import main
    fasta, bed = genome
    folder = tmp_path / "modisco"
    assert main(["genome", str(MODEL), "--fasta", str(fasta), "--bed", str(bed), "--width", str(WIDTH),
                 "--shuffles", str(SHUFFLES), "--out", str(tmp_path / "s.zarr"), "--modisco-out",
                 str(folder), "--no-progress"]) == 0
    result = folder / "modisco_results.h5"
    subprocess.run([modisco, "motifs", "-s", str(folder / "ohe.npz"), "-a", str(folder / "shap.npz"),
                    "-n", "2000", "-w", str(WIDTH), "-o", str(result)], check=True, capture_output=True)
    with h5py.File(result, "r") as f:
        assert "pos_patterns" in f, "modisco found no positive pattern"
        patterns = f["pos_patterns"]
        names = sorted(patterns, key=lambda p: int(p.split("_")[1]))[:3]  # ranked by seqlets
        scores = [_best_match(patterns[p]["sequence"][:], "GATA") for p in names]
    assert max(scores) > 0.8, scores
