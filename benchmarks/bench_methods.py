"""Method benchmarks (issue 3): liftir vs Captum for many targets, DeepLIFT-SHAP and IG.

In one run, per case, the median wall clock (after a warm-up) of
  * all-class attribution: liftir `target="all"` (one forward, batched backward) against
    Captum's DeepLift looping over the classes (what Captum users do);
  * deeplift_shap with 20 references against Captum's DeepLiftShap;
  * integrated gradients, 50 steps, against Captum's IntegratedGradients;
each with liftir's interpreter and its compiled engine (`engine="compiled"`, "-" where the
method does not compile yet), and the max relative difference between liftir and Captum. Run
``python benchmarks/bench_methods.py [--write]``; the table goes to benchmarks/results_methods.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
sys.path.insert(0, str(ROOT))

import zoo  # noqa: E402
from bench_deeplift import timed  # noqa: E402

import liftir  # noqa: E402
from liftir.compile import forms  # noqa: E402
from liftir.compile.compiler import COMPILED_METHODS  # noqa: E402


def _quiet(fn):
    def wrapped():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    return wrapped


def cases():
    """(label, model name, kwargs, batch, n_classes)."""
    return [
        ("all_conv, 10 classes", "all_conv", {"width": 32}, 16, 10),
        ("vgg_maxpool, 200 classes", "vgg_maxpool", {"widths": (16, 32, 64)}, 4, 200),
        ("mlp", "mlp_relu_sigmoid_tanh", {}, 64, 5),
    ]


def bench_case(label, name, kwargs, batch, n_classes, repeats, warmup):
    from captum.attr import DeepLift, DeepLiftShap, IntegratedGradients

    model = zoo.build(name, **kwargs)
    x = zoo.make_input(name, batch, seed=1)
    proto = zoo.export(model, zoo.make_input(name, 2), None, dynamo=False)
    x_np = x.numpy()
    rows = []

    zeros = torch.zeros_like(x[:1])
    interp = {m: liftir.Explainer(proto, m) for m in ("deeplift", "deeplift_shap", "integrated_gradients")}

    def both(method, **call):
        """(interpreter ms, result, compiled ms or None) for one liftir call."""
        t, result = timed(lambda: interp[method].attribute(x_np, **call), repeats, warmup)
        comp = liftir.Explainer(proto, method, engine="compiled")
        comp.attribute(x_np, **call)  # compiles
        if method not in COMPILED_METHODS or not all(p is not None for p in comp._compiled.passes.values()):
            return t, result, None
        tc, _ = timed(lambda: comp.attribute(x_np, **call), repeats, max(warmup, forms.SETTLED_AFTER))
        return t, result, tc

    # all classes
    t_ours, ours, t_comp = both("deeplift", baselines=zeros.numpy(), target="all")
    dl = DeepLift(model)
    t_cap, theirs = timed(_quiet(lambda: torch.stack(
        [dl.attribute(x, baselines=zeros.expand_as(x), target=t) for t in range(n_classes)], 1)), repeats, warmup)
    rows.append((label, f"all {n_classes} classes", batch, t_ours, t_comp, t_cap, ours, theirs.detach().numpy()))

    # DeepLIFT-SHAP, 20 references
    refs = zoo.make_input(name, 20, seed=7) * 0.5
    t_ours, ours, t_comp = both("deeplift_shap", baselines=refs.numpy(), target=1)
    t_cap, theirs = timed(_quiet(lambda: DeepLiftShap(model).attribute(x, baselines=refs, target=1)), repeats, warmup)
    rows.append((label, "deeplift_shap, 20 refs", batch, t_ours, t_comp, t_cap, ours, theirs.detach().numpy()))

    # integrated gradients, 50 steps
    t_ours, ours, t_comp = both("integrated_gradients", baselines=zeros.numpy(), target=1, n_steps=50)
    t_cap, theirs = timed(_quiet(lambda: IntegratedGradients(model).attribute(
        x, baselines=zeros.expand_as(x), target=1, n_steps=50)), repeats, warmup)
    rows.append((label, "integrated_gradients, 50 steps", batch, t_ours, t_comp, t_cap, ours,
                 theirs.detach().numpy()))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    lines = ["| model | task | batch | Captum ms | liftir ms | liftir/Captum | liftir compiled ms | compiled/Captum "
             "| max rel diff |", "|---|---|---|---|---|---|---|---|---|"]
    for case in cases():
        print("...", case[0], file=sys.stderr)
        for label, task, batch, t_ours, t_comp, t_cap, ours, theirs in bench_case(*case, args.repeats, args.warmup):
            diff = np.abs(np.asarray(ours) - theirs).max() / max(np.abs(theirs).max(), 1e-12)
            comp = "- | -" if t_comp is None else f"{t_comp:.0f} | {t_comp / t_cap:.2f}"
            lines.append(f"| {label} | {task} | {batch} | {t_cap:.0f} | {t_ours:.0f} | {t_ours / t_cap:.2f} | {comp} "
                         f"| {diff:.1e} |")
    header = (f"CPU: {platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()}; torch "
              f"{torch.__version__}; median of {args.repeats} after {args.warmup} warm-up (compiled: {max(args.warmup, forms.SETTLED_AFTER)}, past its passes' form trial)\n")
    text = header + "\n" + "\n".join(lines) + "\n"
    print(text)
    if args.write:
        (ROOT / "results_methods.md").write_text("# Method benchmarks\n\nProduced by `python benchmarks/bench_methods.py "
                                                 "--write`.\n\n" + text)


if __name__ == "__main__":
    main()
