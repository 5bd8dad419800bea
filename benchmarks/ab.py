"""Interleaved A/B of liftir's attribution time: a git revision (A) against the work tree (B).

This VM's timings drift by 10-30% between runs minutes apart, far more than most single
changes move them. Timing both versions in the same minutes, call for call, cancels the
drift: two worker processes (one per version) build the same Explainer on the same model
and inputs, and the parent asks each for one `attribute` call in turn. It prints the
medians, B/A, and max|B - A| / max|A| of the attributions (0 for a change meant to keep the
bits). One thread each by default: with two workers' thread pools on two cores, Swin's
pass took 38 ms at two threads where a lone session takes 28 (and 34 at one thread).

    python benchmarks/ab.py vit swin                     # HEAD against the work tree
    python benchmarks/ab.py --base HEAD~3 vgg_maxpool --repeats 15 --engine interpreter

Models are the names of `benchmarks/profile_compiled.py` (bench_deeplift's and
bench_architectures'). Version A is `git archive REV` unpacked in a temporary folder, its
`rules/` mapped to `liftir.rules` as the editable install maps the work tree's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_WORKER = r'''
import importlib.abc, importlib.machinery, importlib.util, json, os, sys, time, warnings
from pathlib import Path
tree = Path(sys.argv[1])
warnings.simplefilter("ignore")


class _Rules(importlib.abc.MetaPathFinder):
    """liftir.rules (and its modules) from this tree's top-level rules/, ahead of the
    editable install's mapping to the work tree."""

    def find_spec(self, name, path=None, target=None):
        if name == "liftir.rules":
            return importlib.util.spec_from_file_location(
                name, tree / "rules" / "__init__.py", submodule_search_locations=[str(tree / "rules")])
        if name.startswith("liftir.rules."):
            return importlib.machinery.PathFinder.find_spec(name, [str(tree / "rules")])
        return None


sys.meta_path.insert(0, _Rules())
sys.path[:0] = [str(tree), str(Path(os.environ["LIFTIR_AB_ROOT"]) / "tests"),
                str(Path(os.environ["LIFTIR_AB_ROOT"]) / "benchmarks")]
import numpy as np
import liftir
import profile_compiled  # the models and inputs come from the work tree's benchmark code
assert Path(liftir.__file__).resolve().is_relative_to(tree.resolve()), liftir.__file__
explainer = call = None
#: calls before the timed ones: a compiled pass past its form trial (liftir/compile/forms.py
#: SETTLED_AFTER, 6), in a version that has one
WARM_UP = 7
for line in sys.stdin:
    request = json.loads(line)
    if request["do"] == "setup":
        proto, x, x0 = profile_compiled.model_and_inputs(request["model"])
        explainer = liftir.Explainer(proto, request["method"], engine=request["engine"])
        target = request["target"]
        call = lambda: explainer.attribute(x, baselines=x0, target=target)
        for _ in range(WARM_UP):
            call()
        reply = {}
    elif request["do"] == "run":
        start = time.perf_counter()
        out = call()
        reply = {"s": time.perf_counter() - start}
    elif request["do"] == "save":
        out = call()
        parts = out.values() if isinstance(out, dict) else [out]
        np.save(request["path"], np.concatenate([np.asarray(p, np.float64).ravel() for p in parts]))
        reply = {}
    print(json.dumps(reply), flush=True)
'''


class Worker:
    """One version's long-lived process, driven a JSON line at a time."""

    def __init__(self, tree: Path, script: Path, threads: int):
        env = dict(os.environ, LIFTIR_AB_ROOT=str(ROOT), PYTHONWARNINGS="ignore")
        if threads:
            env.update(LIFTIR_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                       OPENBLAS_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([sys.executable, str(script), str(tree)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env,
                                     stderr=None if os.environ.get("LIFTIR_AB_STDERR") else subprocess.DEVNULL)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"a worker died on {request} (LIFTIR_AB_STDERR=1 shows its traceback)")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def unpack(rev: str, into: Path) -> Path:
    """`git archive rev` unpacked under `into`."""
    archive = into / "base.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), rev], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "base", filter="data")
    return into / "base"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="names known to benchmarks/profile_compiled.py")
    p.add_argument("--base", default="HEAD", help="the git revision timed as A (default HEAD)")
    p.add_argument("--repeats", type=int, default=11, help="timed calls per version and model")
    p.add_argument("--engine", default="compiled", choices=["compiled", "interpreter"])
    p.add_argument("--method", default="deeplift")
    p.add_argument("--target", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="threads per worker (0: liftir's default)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        script = folder / "worker.py"
        script.write_text(_WORKER)
        trees = {"A": unpack(args.base, folder), "B": ROOT}
        print(f"A = {args.base}, B = the work tree; {args.engine} engine, {args.method}, "
              f"{args.threads or 'default'} thread(s), {args.repeats} interleaved calls each after 7 warm-up calls")
        for model in args.models:
            # the worker set up second ran 4-5% faster in null A/Bs (both trees one commit),
            # whichever it was: half the calls with each set up first, and the two ratios'
            # geometric mean, which cancels that
            times: dict[str, list[float]] = {"A": [], "B": []}
            ratios, saved = [], {}
            for first in "AB":
                order = first + ("B" if first == "A" else "A")
                workers = {k: Worker(trees[k], script, args.threads) for k in order}
                try:
                    for k in order:
                        workers[k].ask(do="setup", model=model, method=args.method, engine=args.engine,
                                       target=args.target)
                    part: dict[str, list[float]] = {"A": [], "B": []}
                    for i in range((args.repeats + 1) // 2):  # A B, B A, ...: neither always runs second
                        for k in ("AB" if i % 2 == 0 else "BA"):
                            part[k].append(workers[k].ask(do="run")["s"])
                    for k in "AB":
                        times[k] += part[k]
                        saved[k] = folder / f"{model}_{k}.npy"
                        workers[k].ask(do="save", path=str(saved[k]))
                finally:
                    for w in workers.values():
                        w.close()
                ratios.append(float(np.median(part["B"]) / np.median(part["A"])))
            a, b = (np.load(saved[k]) for k in "AB")
            ta, tb = (1e3 * float(np.median(times[k])) for k in "AB")
            diff = float(np.abs(b - a).max() / max(float(np.abs(a).max()), 1e-300)) if a.shape == b.shape else float("nan")
            print(f"{model}: A {ta:.1f} ms, B {tb:.1f} ms, B/A {float(np.sqrt(ratios[0] * ratios[1])):.3f} "
                  f"(A set up first {ratios[0]:.3f}, B first {ratios[1]:.3f}), max|B - A| / max|A| {diff:.2e}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
