"""DeepLIFT on transformer and recurrent models: liftir vs Captum, an onnxruntime forward as yardstick.

Per model, in its own subprocess (so each tool's peak memory is its own measurement), side by
side: the median (after a warm-up) of
  * ORT forward     onnxruntime InferenceSession.run on the batch
  * Captum          DeepLift(model) on the input (image, DNA, float sequences), or
                    LayerDeepLift(model, word embedding) for token-id models (BERT, GPT-2)
  * liftir          Explainer(onnx_model, "deeplift").attribute(...) with the same reference
  * liftir compiled the same with engine="compiled" (the pass as one ONNX graph in one
                    onnxruntime session; its first call, which traces and starts the session,
                    is reported apart as "compile s" and is not in the median)
and each one's peak resident set size (Linux VmHWM over its warm-up calls, reset before each
tool through /proc/self/clear_refs; it includes the process's baseline: Python, torch, the
model). The timed calls are interleaved, one of each tool per round in a rotating order, so
that the VM's drift (10-30% between runs minutes apart, Captum's time included) falls on all
tools alike and the ratios compare calls made in the same seconds. With several threads each
timed call waits SETTLE_S idle first, so that no tool pays for the spinning worker threads
the previous tool's call left behind.
Models are the zoo's architectures (tests/zoo_transformers.py, tests/zoo_sequence.py) at
larger configurations, random weights. Run ``python benchmarks/bench_architectures.py
--help``; ``--write`` writes benchmarks/results_architectures.md; ``--profile MODEL`` prints
a cProfile of liftir's attribute on one model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

# model -> (exporter, batch, description); the exporter is the one liftir conserves on
# (BERT and GPT-2 through TorchScript give NaN today, see the README's architectures table)
BENCHES = {
    "vit": ("ts17", 16, "timm ViT, 64x64, patch 8 (64 tokens), depth 4, dim 128, 4 heads"),
    "swin": ("ts17", 16, "timm Swin, 64x64, patch 4, window 4, dim 32, depths (2, 2)"),
    "bert": ("dynamo", 16, "HF BERT, 32 tokens, 2 layers, hidden 128, 4 heads"),
    "gpt2": ("dynamo", 16, "HF GPT-2, 32 tokens, 2 layers, n_embd 128, 4 heads"),
    "lstm_bi": ("ts17", 64, "bidirectional LSTM, 100 steps, 32 features, hidden 64"),
    "gru": ("ts17", 64, "GRU, 100 steps, 32 features, hidden 128"),
    "enformer_small": ("ts17", 16, "Enformer-style, 1024 bp, width 64, 2 attention blocks"),
    "enformer_variants": ("ts17", 16, "the Enformer-style net, each sequence one base from a shared reference "
                                      "sequence (a variant's effect)"),
}
SEQ, VOCAB = 32, 1000  # zoo_transformers.export allows sequences up to 32 with dynamo


def build(name):
    """(torch model, example inputs (torch), names, baselines (torch), captum layer or None)."""
    import torch
    import zoo_sequence as zs
    import zoo_transformers as zt
    g = torch.Generator().manual_seed(1)
    batch = BENCHES[name][1]
    if name in ("vit", "swin"):
        zt._timm()
        if name == "vit":
            from timm.models.vision_transformer import VisionTransformer
            model = VisionTransformer(img_size=64, patch_size=8, depth=4, embed_dim=128, num_heads=4, num_classes=10)
        else:
            from timm.models.swin_transformer import SwinTransformer
            model = SwinTransformer(img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2),
                                    num_heads=(2, 4), num_classes=10)
        model = zt._seed_(model, 0)
        x = torch.randn((batch, 3, 64, 64), generator=g)
        return model, (x,), ["input"], (0.1 * torch.randn((1, 3, 64, 64), generator=g),), None
    if name in ("bert", "gpt2"):
        from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel
        if name == "bert":
            inner = BertForSequenceClassification(BertConfig(
                hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                vocab_size=VOCAB, max_position_embeddings=128, num_labels=3, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0))
            model = zt.BertClassifier.__new__(zt.BertClassifier)
        else:
            inner = GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
            model = zt.GPT2NextToken.__new__(zt.GPT2NextToken)
        torch.nn.Module.__init__(model)
        model.model = inner
        model = zt._seed_(model, 0)
        ids = torch.randint(1, VOCAB, (batch, SEQ), generator=g)
        mask = torch.ones((batch, SEQ), dtype=torch.int64)
        layer = inner.bert.embeddings.word_embeddings if name == "bert" else inner.transformer.wte
        return model, (ids, mask), ["input_ids", "attention_mask"], (torch.zeros((1, SEQ), dtype=torch.int64),), layer
    if name in ("lstm_bi", "gru"):
        kind, bi, hidden = ("LSTM", True, 64) if name == "lstm_bi" else ("GRU", False, 128)
        model = zs.seed_(zs.RecurrentClassifier(kind, bi, hidden=hidden, features=32, front=32), 0)
        x = torch.randn((batch, 100, 32), generator=g)
        return model, (x,), ["input"], (0.3 * torch.randn((1, 100, 32), generator=g),), None
    if name in ("enformer_small", "enformer_variants"):
        model = zs.seed_(zs.EnformerSmall(width=64, heads=4, blocks=2, length=1024), 0)
        idx = torch.randint(0, 4, (batch, 1024), generator=g)
        x = torch.nn.functional.one_hot(idx, 4).permute(0, 2, 1).float().contiguous()
        if name == "enformer_small":
            return model, (x,), ["input"], (torch.full((1, 4, 1024), 0.25),), None
        # every sample the first sequence with one base changed, at a position of its own
        variants = idx[:1].repeat(batch, 1)
        at = torch.randperm(1024, generator=g)[:batch]
        variants[torch.arange(batch), at] = (variants[torch.arange(batch), at] + 1 + torch.arange(batch) % 3) % 4
        alt = torch.nn.functional.one_hot(variants, 4).permute(0, 2, 1).float().contiguous()
        return model, (alt,), ["input"], (x[:1],), None
    raise KeyError(name)


def export(model, inputs, names, how):
    import zoo_transformers as zt

    class Spec:
        text = len(names) == 2

        def inputs(self, n, seed=0):
            return tuple(t[:n] for t in inputs)

        def input_names(self):
            return names

    return zt.export(model, Spec(), how)


def _clear_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size
        return True
    except OSError:
        return False


def _peak_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def warm(fn, warmup):
    """fn's last result after `warmup` calls (at least one), and the peak RSS they reached."""
    _clear_peak()
    out = fn()
    for _ in range(warmup - 1):
        out = fn()
    return out, _peak_mib()


#: idle seconds before each timed call when the tools run several threads. OpenBLAS (NumPy's
#: BLAS, which liftir's interpreter calls) leaves its worker threads spinning ~0.1 s after a
#: call; a call of another tool made in that time shares the cores with them: the compiled
#: pass of a ViT took 70 ms right after an interpreter call against 39 ms alone (2-core Xeon,
#: 2026-12-07). With one thread no tool has worker threads, and no pause is made.
SETTLE_S = 0.2


def timed_interleaved(fns: dict, repeats: int, settle_s: float = 0.0) -> dict:
    """Median ms of each function, called in rounds (one call each, the order rotating),
    each call after `settle_s` idle seconds."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(settle_s)
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) * 1e3 for n, t in times.items()}


def run_one(name, repeats, warmup, target=1):
    """Everything for one model, in this process; returns a JSON-able row."""
    import onnxruntime as ort
    import torch
    from captum.attr import DeepLift, LayerDeepLift

    import liftir
    from liftir.compile import forms

    threads = int(os.environ.get("BENCH_THREADS", "0"))
    torch.set_num_threads(threads or os.cpu_count() or 1)
    how, batch, what = BENCHES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, inputs, names, baselines, layer = build(name)
        proto = export(model, inputs, names, how)
    feeds = {k: v.numpy() for k, v in zip(names, inputs)}
    row = {"model": name, "what": what, "exporter": how, "batch": batch, "rss_reset": _clear_peak()}

    options = ort.SessionOptions()
    if threads:  # the yardstick forward gets the threads liftir and Captum get
        options.intra_op_num_threads = threads
    sess = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def forward():
        return sess.run(None, feeds)
    _, row["ort_rss"] = warm(forward, warmup)

    def captum():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if layer is None:
                return DeepLift(model).attribute(inputs[0], baselines=baselines[0], target=target).detach()
            base = baselines[0].expand_as(inputs[0])
            return LayerDeepLift(model, layer).attribute(inputs[0], baselines=base, target=target,
                                                         additional_forward_args=inputs[1:]).detach()

    want, row["captum_rss"] = warm(captum, warmup)
    want = want.numpy()

    explainer = liftir.Explainer(proto, method="deeplift")
    if layer is None:
        args, base = feeds["input"], baselines[0].numpy()
    else:
        args, base = feeds, {"input_ids": baselines[0].numpy()}

    def ours():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return explainer.attribute(args, baselines=base, target=target, return_convergence_delta=True)

    (got, delta), row["liftir_rss"] = warm(ours, warmup)
    if layer is not None:
        got = got[explainer.attributed[0]]

    compiled = liftir.Explainer(proto, method="deeplift", engine="compiled")

    def ours_compiled():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return compiled.attribute(args, baselines=base, target=target, return_convergence_delta=True)

    _clear_peak()
    t0 = time.perf_counter()
    ours_compiled()  # traces the pass and starts its session
    row["compile_s"] = time.perf_counter() - t0
    peak = _peak_mib()
    # past the passes' form trial (liftir/compile/forms.py): the steady state a loop runs in
    (got_c, delta_c), row["compiled_rss"] = warm(ours_compiled, max(warmup, forms.SETTLED_AFTER))
    row["compiled_rss"] = max(peak, row["compiled_rss"])
    medians = timed_interleaved({"ort": forward, "captum": captum, "liftir": ours, "compiled": ours_compiled},
                                repeats, settle_s=0.0 if threads == 1 else SETTLE_S)
    row.update({f"{k}_ms": v for k, v in medians.items()})
    reasons = list(compiled._compiled.reasons.values())
    row["compiled_fallback"] = reasons[0][:150] if reasons else ""
    if layer is not None:
        got_c = got_c[compiled.attributed[0]]
    row["compiled_vs_interpreter"] = float(np.abs(got_c - got).max() / np.abs(got).max())
    with torch.no_grad():
        diff = model(*inputs)[:, target] - (model(*baselines) if layer is None else
                                            model(baselines[0].expand_as(inputs[0]), *inputs[1:]))[:, target]
    row["delta"] = float(np.abs(delta).max() / np.abs(diff.numpy()).max())
    row["compiled_delta"] = float(np.abs(delta_c).max() / np.abs(diff.numpy()).max())
    row["captum_delta"] = float(np.abs(want.reshape(batch, -1).sum(1) - diff.numpy()).max() / np.abs(diff.numpy()).max())
    row["diff_vs_captum"] = float(np.abs(got - want).max() / np.abs(want).max())
    return row


def profile(name, repeats=3):
    import cProfile
    import pstats

    import liftir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, inputs, names, baselines, layer = build(name)
        proto = export(model, inputs, names, BENCHES[name][0])
    feeds = {k: v.numpy() for k, v in zip(names, inputs)}
    ex = liftir.Explainer(proto, method="deeplift")
    args, base = ((feeds["input"], baselines[0].numpy()) if layer is None else
                  (feeds, {"input_ids": baselines[0].numpy()}))
    ex.attribute(args, baselines=base, target=1)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(repeats):
        ex.attribute(args, baselines=base, target=1)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def table(rows):
    head = ("| model | exporter | batch | ORT fwd ms | Captum ms | liftir ms | liftir compiled ms | liftir/Captum | "
            "compiled/Captum | compiled/liftir | liftir/ORT-fwd | compiled/ORT-fwd | compile s | "
            "peak RSS MiB ORT / Captum / liftir / compiled | liftir \\|delta\\| rel | compiled \\|delta\\| rel | "
            "Captum \\|delta\\| rel | max rel diff vs Captum | compiled vs liftir |")
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {BENCHES[r['model']][0]} | | failed: {r['error']} |" + "|" * 16)
            continue
        fallback = f" (interpreter: {r['compiled_fallback']})" if r.get("compiled_fallback") else ""
        lines.append(
            f"| {r['model']} | {r['exporter']} | {r['batch']} | {r['ort_ms']:.1f} | {r['captum_ms']:.1f} | "
            f"{r['liftir_ms']:.1f} | {r['compiled_ms']:.1f}{fallback} | **{r['liftir_ms'] / r['captum_ms']:.2f}** | "
            f"**{r['compiled_ms'] / r['captum_ms']:.2f}** | {r['compiled_ms'] / r['liftir_ms']:.2f} | "
            f"{r['liftir_ms'] / r['ort_ms']:.1f} | {r['compiled_ms'] / r['ort_ms']:.1f} | {r['compile_s']:.1f} | "
            f"{r['ort_rss']:.0f} / {r['captum_rss']:.0f} / {r['liftir_rss']:.0f} / {r['compiled_rss']:.0f} | "
            f"{r['delta']:.1e} | {r['compiled_delta']:.1e} | {r['captum_delta']:.1e} | {r['diff_vs_captum']:.1e} | "
            f"{r['compiled_vs_interpreter']:.1e} |")
    lines.append("")
    lines += [f"- {r['model']}: {BENCHES[r['model']][2]}" for r in rows]
    return "\n".join(lines)


def header(repeats, warmup, load):
    import captum
    from liftir.compile import forms
    import onnxruntime
    import torch
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    after = "/".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"CPU: {cpu}, os.cpu_count()={os.cpu_count()}; torch {torch.__version__}, onnxruntime "
            f"{onnxruntime.__version__}, captum {captum.__version__}; median of {repeats} interleaved rounds after {warmup} warm-up (compiled: {max(warmup, forms.SETTLED_AFTER)}, past its passes' form trial); "
            f"target 1; {time.strftime('%Y-%m-%d %H:%M')}; load average before {load}, after {after}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(BENCHES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--write", action="store_true", help="write benchmarks/results_architectures.md")
    p.add_argument("--threads", type=int, default=0,
                   help="BLAS / OpenMP / torch / onnxruntime / liftir threads in each child (0: the "
                        "libraries' defaults, all cores)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one model, JSON on stdout
    p.add_argument("--profile", help="cProfile liftir's attribute on this model")
    args = p.parse_args(argv)
    if args.profile:
        profile(args.profile)
        return 0
    if args.one:
        print("ROW " + json.dumps(run_one(args.one, args.repeats, args.warmup)))
        return 0
    load = "/".join(f"{v:.1f}" for v in os.getloadavg())
    rows = []
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        print(f"... {name}", file=sys.stderr, flush=True)
        env = dict(os.environ)
        if args.threads:
            # LIFTIR_NUM_THREADS: liftir's onnxruntime sessions and thread pool (else all cores)
            env.update({k: str(args.threads) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                       "LIFTIR_NUM_THREADS", "BENCH_THREADS")})
        done = subprocess.run([sys.executable, __file__, "--one", name, "--repeats", str(args.repeats),
                               "--warmup", str(args.warmup)], capture_output=True, text=True, cwd=ROOT, env=env)
        line = next((x for x in done.stdout.splitlines() if x.startswith("ROW ")), None)
        if line is None:
            rows.append({"model": name, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:150]})
        else:
            rows.append(json.loads(line[4:]))
    threads = (f"{args.threads} thread(s) for BLAS, OpenMP, torch, onnxruntime and liftir" if args.threads
               else "default threads (all cores)")
    text = f"{header(args.repeats, args.warmup, load)}; {threads}\n\n{table(rows)}\n"
    print(text)
    if args.write:
        out = ROOT / "benchmarks" / "results_architectures.md"
        title = ("# DeepLIFT on transformers and recurrent models: liftir vs Captum\n\n"
                 "Produced by `python benchmarks/bench_architectures.py --write [--threads N]`; see README.md.\n")
        sections = {}
        if out.exists():  # one section per thread setting; this run replaces its own
            for part in out.read_text().split("\n## ")[1:]:
                head, _, body = part.partition("\n")
                sections[head] = body
        sections[f"threads: {args.threads or 'default'}"] = "\n" + text
        out.write_text(title + "".join(f"\n## {h}\n{b}" for h, b in sorted(sections.items())))
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
