"""The `liftir` command: explain a model, check its rules, list op coverage.

Exit codes, the same for every command: 0 success; 1 conservation lost (`check` found a
node or the model not conserving, or the forward differing from onnxruntime); 2 a usage,
input or support problem (bad arguments, unreadable files, an op or a use of an op liftir
has no rule for), reported as one 'liftir: error: ...' line on stderr without a
traceback (`ops` lists what is not covered, then exits 2); 130 interrupted.

Output files are checked before anything is computed (folder exists and is writable) and
written to a temporary file in the same folder, then renamed: a run that fails part-way
leaves an existing file as it was.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

from . import __version__
from .errors import InputError, LiftirError
from .methods import Mode, Passes, Precision

PROG = "liftir"
RESERVED_KEYS = ("delta", "targets", "method", "output")
DEFAULT_BATCH = 128

MAIN_EPILOG = """\
examples:
  liftir explain model.onnx --input x.npy --target 3 --out attr.npz
  liftir check model.onnx                  # per-node summation-to-delta + onnxruntime forward
  liftir ops model.onnx                    # which op types of the model have rules
  liftir genome model.onnx --fasta g.fa --bed peaks.bed --width 2114 --out scores.zarr
  liftir compile model.onnx --method deeplift --target 3 -o explainer.onnx  # serve without liftir

exit codes: 0 ok; 1 conservation lost or forward differs from onnxruntime (check);
  2 bad arguments or files, or the model needs a rule liftir does not have (explain,
  check and ops alike); 130 interrupted.
Run 'liftir COMMAND --help' for the options of each command.
"""

EXPLAIN_EPILOG = """\
examples:
  liftir explain model.onnx --input x.npy --target 3 --out attr.npz
  liftir explain model.onnx --input batch.npz --baseline 0.5 --target all --out attr.npz
  liftir explain model.onnx --input x.npy --baseline ref.npy --target 0,2 --plot attr.png --out attr.npz
  liftir explain model.onnx --input x.npy --target labels.npy --batch-size 64 --out attr.npz

inputs and baselines: a .npy for a one-input model; a .npz with one array per model input
(matched by name; a single array fits a single input whatever its name).
--baseline: zeros (default), a number, or a .npy/.npz of shape (N, ...), (1, ...) or (...).
--target: INT (one class for every sample); i,j,... or 'all' (SEVERAL CLASSES for every
sample: attributions (N, K, ...), delta (N, K)); or a .npy of one int per sample. Class
indices count from 0; negative indices are refused. Not needed when the output has one
value per sample.
  Note: '--target 1,2,3' is NOT Python's target=[1, 2, 3] (one class per sample): it is
  target=[[1, 2, 3]], classes 1, 2 and 3 for every sample. Per-sample classes: np.save
  them and pass --target labels.npy.
--precision float64 runs the whole graph in double precision (the remedy the float32
warnings name); default: the model's own precision.
--batch-size: samples per pass; default 128, or on a terminal ~N/10 (8 to 128) so that
the progress bar, which appears once a run has lasted a second, moves (--no-progress: 128).
The .npz written holds one attribution array per input name, 'delta' (summation-to-delta
residual per sample; reference methods only), 'targets', 'method' and 'output'.
--plot picks the figure from the first input's rank: 4-D images -> heatmap, (N, L, 4) or
(N, 4, L) -> sequence logo, 2-D -> feature bars (first sample, first target).
"""

CHECK_EPILOG = """\
examples:
  liftir check model.onnx
  liftir check model.onnx --input x.npy --samples 16 --rtol 1e-5
  liftir check model.onnx --max-rule paper     # check the paper's max rule instead

Every node's DeepLIFT rule must conserve sum(m_out * dy) = sum(m_in * dx) under random
output multipliers; nodes that do not are named with their op type and residual. The
forward is compared with onnxruntime (skipped for custom-domain ops). Inputs default to
standard normal of the declared shapes (symbolic batch -> --samples rows); other unknown
dimensions need --input. Exit 1 if any check fails.
"""

OPS_EPILOG = """\
examples:
  liftir ops                       # every op type liftir has a rule for
  liftir ops --method guided_backprop
  liftir ops model.onnx            # coverage of one model; exit 2 if explain would refuse it
  liftir ops model.onnx --input x.npy

With MODEL, ops builds what explain builds and runs every rule once (forward and the
method's backward) on inputs of the declared shapes (or --input), so that a rule's own
requirement (a Div by an activation, a non-constant Pow exponent, ...) is reported here
too, not only a missing op type.
"""


class CLIError(Exception):
    """A problem with the command line or the files it names (exit 2)."""


# ---- argument types -----------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


# ---- files ----------------------------------------------------------------------------------

def load_arrays(path: str, what: str) -> np.ndarray | dict[str, np.ndarray]:
    """A .npy as an array, a .npz as a dict of arrays (never unpickling anything)."""
    if not os.path.exists(path):
        raise CLIError(f"{what} file {path!r} does not exist")
    if os.path.isdir(path):
        raise CLIError(f"{what} {path!r} is a directory, not a .npy/.npz file")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK"):
        raise CLIError(f"{what} file {path!r} is not a readable .npy/.npz file (save arrays "
                       f"with np.save or np.savez)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise CLIError(f"{what} file {path!r} holds Python objects (pickled); save plain "
                           f"numeric arrays with np.save/np.savez") from None
        raise CLIError(f"{what} file {path!r} is not a readable .npy/.npz file: {exc}") from None
    except Exception as exc:  # OSError, zipfile errors, EOFError on truncated files
        raise CLIError(f"{what} file {path!r} is not a readable .npy/.npz file: {exc}") from None
    if isinstance(loaded, np.ndarray):
        return loaded
    try:
        with loaded:
            arrays = {k: loaded[k] for k in loaded.files}
    except Exception as exc:
        raise CLIError(f"{what} file {path!r}: cannot read its arrays: {exc}") from None
    if not arrays:
        raise CLIError(f"{what} file {path!r} holds no arrays")
    return arrays


def check_writable(path: str, what: str, reads: Sequence[str] = ()) -> str:
    """`path` as it will be written, refused now if it cannot be (before a long run).

    The folder must exist and be writable, the path must not be a folder, and it must not
    be one of the files the run reads.
    """
    full = os.path.abspath(path)
    parent = os.path.dirname(full)
    if not os.path.isdir(parent):
        raise CLIError(f"cannot write {what} {path!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"cannot write {what} {path!r}: directory {parent!r} is not writable")
    if os.path.isdir(full):
        raise CLIError(f"cannot write {what} {path!r}: it is a directory")
    if os.path.exists(full) and not os.access(full, os.W_OK):
        raise CLIError(f"cannot write {what} {path!r}: the file is not writable")
    for other in reads:
        if other and os.path.exists(full) and os.path.exists(other) and os.path.samefile(other, full):
            raise CLIError(f"{what} {path!r} is also a file this run reads; choose another name")
    return path


def write_atomically(path: str, write) -> None:
    """Call `write(tmp)` on a temporary file next to `path`, then rename it to `path`.

    A run that fails part-way (an exception, a full disk) leaves an existing `path`
    untouched and no partial file behind. The file gets the mode a plain open() would give
    (or keeps the existing file's).
    """
    import tempfile  # noqa: PLC0415

    full = os.path.abspath(path)
    parent, name = os.path.split(full)
    suffix = os.path.splitext(name)[1]  # matplotlib picks the format from it
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        if os.path.exists(full):
            mode = os.stat(full).st_mode & 0o777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, full)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def match_inputs(arrays, names: list[str], what: str, path: str) -> dict[str, np.ndarray]:
    """Arrays keyed by model input name (.npz keys must name the inputs)."""
    if isinstance(arrays, np.ndarray):
        if len(names) != 1:
            raise CLIError(f"the model has {len(names)} inputs ({', '.join(names)}); give the "
                           f"{what} as a .npz with one array per input name, not {path!r}")
        return {names[0]: arrays}
    if all(n in arrays for n in names):
        extra = sorted(set(arrays) - set(names))
        if extra:
            print(f"liftir: note: ignoring arrays {extra} of {path!r} (not model inputs)", file=sys.stderr)
        return {n: arrays[n] for n in names}
    if len(names) == 1 and len(arrays) == 1:
        return {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    raise CLIError(f"{what} file {path!r} has arrays {sorted(arrays)}; the model inputs are "
                   f"{names} (missing {missing}); name the .npz arrays after the inputs, "
                   f"e.g. np.savez(path, **{{{names[0]!r}: x}})")


def _load_model_explainer(args, method: str, output=None):
    from .explainer import Explainer  # noqa: PLC0415 - keeps `liftir --help` fast

    return Explainer(args.model, method=method, backend=getattr(args, "backend", "numpy"),
                     max_rule=args.max_rule, final_activation=getattr(args, "final_activation", "strip"),
                     output=output, precision=getattr(args, "precision", "model"),
                     engine=getattr(args, "engine", "interpreter"))


def _baselines(spec: str | None, names: list[str]):
    if spec is None or spec.lower() in ("zeros", "zero"):
        return None
    try:
        return float(spec)
    except ValueError:
        pass
    return match_inputs(load_arrays(spec, "baseline"), names, "baseline", spec)


# ---- explain --------------------------------------------------------------------------------

def _parse_target(spec: str | None, n: int):
    """The Explainer target for --target, and whether results get a target axis (N, K, ...)."""
    if spec is None:
        return None, False
    text = spec.strip()
    if text.lower() == "all":
        return "all", True
    if text.endswith(".npy"):
        arr = load_arrays(text, "target")
        if not isinstance(arr, np.ndarray) or arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise CLIError(f"target file {text!r} must hold a 1-D int array (one class per sample)")
        if arr.shape[0] != n:
            raise CLIError(f"target file {text!r} has {arr.shape[0]} entries for {n} samples")
        return arr, False
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts if p]
    except ValueError:
        raise CLIError(f"--target must be an int, 'all', a comma-separated list of ints or a .npy "
                       f"of one int per sample, got {spec!r}") from None
    if not values:
        raise CLIError(f"--target is empty: {spec!r}")
    if len(values) == 1 and "," not in text:
        return values[0], False
    return np.asarray([values], dtype=np.int64), True  # (1, K): the same K classes for every sample


def _describe_target(target) -> str:
    if isinstance(target, str):
        return "all classes"
    if isinstance(target, np.ndarray):
        if target.ndim == 2:
            vals = target[0].tolist()
            return f"{len(vals)} classes ({', '.join(map(str, vals[:8]))}{', ...' if len(vals) > 8 else ''})"
        return "one class per sample (from file)"
    return str(target)


def _output_path(args) -> str:
    return args.out if args.out.endswith(".npz") else args.out + ".npz"


def _auto_batch_size(n: int, bar_possible: bool) -> int:
    """128 rows per pass, or fewer (>= 8) so that a visible progress bar moves ~10 times."""
    if not bar_possible:
        return DEFAULT_BATCH
    return int(min(DEFAULT_BATCH, max(8, -(-n // 10))))


def cmd_explain(args) -> int:
    # every output path is checked before the model is even loaded: a typo costs nothing
    reads = [args.model, args.input, args.baseline, args.target]
    out = check_writable(_output_path(args), "--out", reads)
    if args.plot:
        check_writable(args.plot, "--plot", reads)
        if os.path.abspath(args.plot) == os.path.abspath(out):
            raise CLIError(f"--out and --plot name the same file {out!r}")
        _plots_module()
    ex = _load_model_explainer(args, args.method, args.output)
    names = ex.input_names
    inputs = match_inputs(load_arrays(args.input, "input"), names, "input", args.input)
    if args.plot:
        _plot_kind(inputs[names[0]])  # no figure for this shape: say so before computing
    ex._output_for_call(None)  # which output: asked before the inputs, as `attribute` asks
    # validated once, as the Explainer validates (an InputError naming the input); every call
    # below takes the batch as it is
    batch = ex.batch(inputs, _baselines(args.baseline, names))
    n = batch.n
    target, multi = _parse_target(args.target, n)
    progress = not args.no_progress
    batch_size = args.batch_size or _auto_batch_size(n, progress and sys.stderr.isatty())
    try:
        attrs, delta = ex.attribute(batch, None, target, return_convergence_delta=True,
                                    batch_size=batch_size, progress=progress, n_steps=args.n_steps)
    except LiftirError as exc:
        if args.target is None and "target" in str(exc):
            raise CLIError(f"{exc}\n  on the command line: --target INT, --target i,j,... or --target all") from None
        raise

    arrays: dict[str, np.ndarray] = {}
    keys = {}
    for name in ex.attributed:  # the inputs; for integer inputs, their embeddings
        keys[name] = f"attr_{name}" if name in RESERVED_KEYS else name
        arrays[keys[name]] = np.asarray(attrs[name])
    if delta is not None:
        arrays["delta"] = np.asarray(delta)
    if target is not None:
        arrays["targets"] = np.asarray(target)
    arrays["method"] = np.asarray(ex.method.name)
    arrays["output"] = np.asarray(ex.output)

    def write_npz(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    try:
        write_atomically(out, write_npz)
    except OSError as exc:
        raise CLIError(f"cannot write {out!r}: {exc}") from None

    plotted = None
    if args.plot:
        first = ex.attributed[0]
        attr = arrays[keys[first]]
        label = target
        if multi:  # (N, K, ...): plot the first target
            attr = attr[:, 0]
            label = 0 if isinstance(target, str) else int(target[0, 0])
        elif isinstance(target, np.ndarray):
            label = int(target[0])
        plotted = _plot(args.plot, inputs[first], attr, ex.method.name, label)

    out_shape = ex.predict(batch.actual().samples(0, 1)).shape[1:]
    print(f"liftir explain: {args.model}")
    print(f"  method      {ex.method.name}" + (f" (max_rule {ex.max_rule})" if ex.method.mode is Mode.DEEPLIFT else "")
          + (" in float64" if ex.precision is Precision.FLOAT64 else ""))
    print(f"  engine      {ex.engine.value}")
    for name in names:
        print(f"  input       {name!r} {tuple(inputs[name].shape)} {inputs[name].dtype}")
    print(f"  output      {ex.output!r} (N, {', '.join(map(str, out_shape))})")
    if target is not None:
        print(f"  target      {_describe_target(target)}")
    if delta is not None:
        what = ("completeness residual of the quadrature" if ex.method.passes is Passes.PATH
                else "summation-to-delta: sum of attributions - (f(x) - f(x0)); ~0 expected")
        print(f"  max |delta| {float(np.abs(delta).max()):.3e}  ({what})")
    else:
        print("  delta       n/a (gradient methods have no summation-to-delta)")
    listing = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items() if v.ndim)
    print(f"  wrote       {out}: {listing}")
    if plotted:
        print(f"  plot        {plotted}")
    return 0


def _plots_module():
    try:
        from . import plots  # noqa: PLC0415 - matplotlib is optional
        import matplotlib  # noqa: F401, PLC0415
    except ImportError as exc:
        raise CLIError(f"--plot needs matplotlib (pip install 'liftir[plot]'): {exc}") from None
    return plots


def _plot_kind(x: np.ndarray) -> str:
    """Which figure the first input's shape gets; a CLIError when none fits."""
    if x.ndim == 4:
        c_first, c_last = x.shape[1] in (1, 3, 4), x.shape[-1] in (1, 3, 4)
        return "image_first" if c_first else "image_last" if c_last else "image_mean"
    if x.ndim == 3 and x.shape[-1] == 4:
        return "dna"
    if x.ndim == 3 and x.shape[1] == 4:
        return "dna_first"
    if x.ndim == 3:
        return "image_2d"
    if x.ndim == 2:
        return "bars"
    raise CLIError(f"--plot: no figure for inputs of shape {x.shape} (images are 4-D, "
                   f"one-hot sequences (N, L, 4) or (N, 4, L), tabular data 2-D)")


def _plot(path: str, x: np.ndarray, attr: np.ndarray, method: str, target) -> str:
    """Draw the first sample's attributions, the figure chosen by the input's rank."""
    plots = _plots_module()
    kind = _plot_kind(x)
    x0 = np.asarray(x[0], dtype=float)
    a0 = np.asarray(attr[0], dtype=float)
    title = f"{method}, sample 0" + ("" if target is None else f", target {target}")

    def draw(tmp: str) -> None:
        if kind in ("image_first", "image_last"):
            plots.image_heatmaps(x0, {method: a0}, channels_last=kind == "image_last", title=title, path=tmp)
        elif kind == "image_2d":
            plots.image_heatmaps(x0, {method: a0}, title=title, path=tmp)
        elif kind == "image_mean":  # many channels (NCHW): the channel mean and per-pixel sums
            plots.image_heatmaps(x0.mean(axis=0), {method: a0.sum(axis=0)}, title=title, path=tmp)
        elif kind == "dna":
            plots.dna_logo(a0, title=title, path=tmp)
        elif kind == "dna_first":
            plots.dna_logo(a0.T, title=title, path=tmp)
        else:
            plots.feature_bars(a0, title=title, path=tmp)

    try:
        write_atomically(path, draw)
    except (ValueError, OSError) as exc:
        raise CLIError(f"--plot {path!r}: {exc}") from None
    return path


# ---- check ------------------------------------------------------------------------------------

def cmd_check(args) -> int:
    from .check import check_model  # noqa: PLC0415
    from .graph import read_model  # noqa: PLC0415

    inputs = baselines = None
    if args.input or (args.baseline and args.baseline.lower() not in ("zeros", "zero")):
        proto = read_model(args.model)
        inits = {t.name for t in proto.graph.initializer}
        names = [i.name for i in proto.graph.input if i.name not in inits]
        if args.input:
            inputs = match_inputs(load_arrays(args.input, "input"), names, "input", args.input)
        baselines = _baselines(args.baseline, names)
    report = check_model(args.model, inputs, baselines, samples=args.samples, rtol=args.rtol,
                         seed=args.seed, max_rule=args.max_rule, output=args.output,
                         final_activation=args.final_activation, precision=args.precision)
    print(report)
    if report.ok:
        return 0
    print(f"liftir: check failed ({len(report.failures)} problem(s)); see the report above",
          file=sys.stderr)
    return 1


# ---- ops ----------------------------------------------------------------------------------------

def _modes_text(rule) -> str:
    from .rule import MODES  # noqa: PLC0415

    supported = [m for m in MODES if rule.supports(m)]
    return "all" if len(supported) == len(MODES) else ",".join(supported)


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = lambda row: "  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return [fmt(header)] + [fmt(r) for r in rows]


def cmd_ops(args) -> int:
    from .methods import get_method  # noqa: PLC0415
    from .registry import lookup, registered_ops, rule_origin  # noqa: PLC0415

    method = get_method(args.method)
    mode = method.mode
    if args.model is None:
        rows = []
        for (domain, op), rule in registered_ops().items():
            qualified = f"{domain}::{op}" if domain else op
            desc = rule.describe(mode) if rule.supports(mode) else f"(none for {method.name})"
            rows.append((qualified, rule_origin(domain, op), _modes_text(rule), desc))
        print(f"liftir ops: {len(rows)} op types with rules; rule shown for method {method.name!r} "
              f"(mode {mode.value!r})")
        print("\n".join(_table(("op", "origin", "modes", "rule"), rows)))
        return 0

    from .folding import fold_constants, static_nodes  # noqa: PLC0415
    from .graph import build_graph, read_model  # noqa: PLC0415

    graph = build_graph(read_model(args.model))
    folded = fold_constants(graph)
    static = static_nodes(graph)
    by_op: dict[tuple[str, str], list[str]] = {}
    opset_of: dict[tuple[str, str], int] = {}
    for name in graph.order:
        if name in static:
            continue
        node = graph.nodes[name]
        key = (node.domain, node.op_type)
        by_op.setdefault(key, []).append(name)
        opset_of[key] = node.opset
    covered, missing = [], []
    for key in sorted(by_op):
        domain, op = key
        qualified = f"{domain}::{op}" if domain else op
        rule = lookup(op, domain, opset_of[key])
        if rule is not None and rule.supports(mode):
            covered.append((qualified, str(len(by_op[key])), rule_origin(domain, op), rule.describe(mode)))
        else:
            why = "no rule" if rule is None else f"rule has no {method.name} mode"
            missing.append((qualified, by_op[key], why))
    print(f"liftir ops: {args.model} (method {method.name!r})")
    if covered:
        print(f"covered ({len(covered)} op types, {sum(int(r[1]) for r in covered)} nodes):")
        print("\n".join(_table(("op", "nodes", "origin", "rule"), covered)))
    skipped = folded + len(static)
    if skipped:
        print(f"{skipped} node(s) are constant or shape arithmetic and need no rule (folded/static)")
    if missing:
        count = sum(len(nodes) for _, nodes, _ in missing)
        print(f"NOT covered ({len(missing)} op types, {count} nodes):")
        for qualified, nodes, why in missing:
            shown = ", ".join(repr(n) for n in nodes[:10]) + (f", ... ({len(nodes) - 10} more)" if len(nodes) > 10 else "")
            print(f"  {qualified}  {len(nodes)} node(s), {why}: {shown}")
        print("Add a rule with @liftir.register_rule (or a plugin package, see examples/custom_rule).")
        # a label head without rules does not stop explain: say what explain itself says
        try:
            _load_model_explainer(args, args.method, args.output)
        except LiftirError as exc:
            print(f"{PROG}: error: explain and check refuse this model: {exc}", file=sys.stderr)
            return 2
        print("(explain does not need these nodes: they are not on the way to the explained output)")
    return _ops_run_rules(args, method.name)


def _ops_run_rules(args, method: str) -> int:
    """Build what explain builds and run every rule once: a rule's own requirements too."""
    from .check import exercise_rules  # noqa: PLC0415

    ex = _load_model_explainer(args, method, args.output)
    inputs = None
    if args.input:
        inputs = match_inputs(load_arrays(args.input, "input"), ex.input_names, "input", args.input)
    try:
        explained = exercise_rules(ex, inputs, args.output)
    except InputError as exc:
        if inputs is None and "pass inputs" in str(exc):
            print(f"OK: every op type has a rule; the rules' own requirements were NOT checked: {exc} "
                  f"(liftir ops MODEL --input x.npy)")
            return 0
        raise
    except LiftirError as exc:
        print(f"NOT supported: {exc}")
        print(f"{PROG}: error: explain and check refuse this model: {exc}", file=sys.stderr)
        return 2
    print(f"OK: every op type of the model has a rule, and every rule on the way to "
          f"{', '.join(map(repr, explained))} ran ({method}, forward and backward)")
    return 0


def _parse_shapes(items) -> dict:
    """--shape NAME=D1,D2 (repeatable) -> {NAME: (D1, D2)}."""
    shapes = {}
    for item in items or ():
        name, sep, dims = item.partition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            sep = ""
        if not sep or not name or not shapes.get(name) or any(d < 1 for d in shapes[name]):
            raise CLIError(f"--shape takes NAME=D1[,D2...] with positive sizes, got {item!r}")
    return shapes


def cmd_compile(args) -> int:
    from .explainer import Explainer  # noqa: PLC0415

    if args.target is not None and args.target.strip().endswith(".npy"):
        raise CLIError("--target for compile is an int, a comma-separated list or 'all' (fixed in the model)")
    target, _ = _parse_target(args.target, args.batch_size)
    explainer = Explainer(args.model, method=args.method, max_rule=args.max_rule,
                          final_activation=args.final_activation)
    model = explainer.compile(args.out, batch_size=args.batch_size, target=target, output=args.output,
                              shapes=_parse_shapes(args.shape))
    names = ", ".join(i.name for i in model.graph.input)
    outs = ", ".join(o.name for o in model.graph.output)
    print(f"wrote {args.out}: {args.method} for target {_describe_target(target) if target is not None else 'None'}, "
          f"batch {args.batch_size}; inputs {names}; outputs {outs} ({len(model.graph.node)} nodes)")
    return 0


# ---- parser ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS  # noqa: PLC0415

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=fmt, epilog=MAIN_EPILOG,
        description="liftir: DeepLIFT and gradient-family attributions for ONNX models.")
    parser.add_argument("--version", action="version", version=f"liftir {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("explain", formatter_class=fmt, epilog=EXPLAIN_EPILOG,
                       help="attribute a model's output to its inputs, write an .npz",
                       description="Attribute a model's output to its inputs and write the "
                                   "attributions to an .npz.")
    p.add_argument("model", metavar="MODEL", help="ONNX model file")
    p.add_argument("--input", "-i", required=True, metavar="FILE", help="inputs, .npy or .npz")
    p.add_argument("--baseline", "-b", metavar="B", default=None,
                   help="reference input: zeros (default), a number, or a .npy/.npz")
    p.add_argument("--target", "-t", metavar="T", default=None,
                   help="INT: one class for every sample; i,j,... or 'all': several classes for "
                        "every sample (unlike Python's target=[i, j, ...], which is one class per "
                        "sample); FILE.npy: one class per sample. Indices count from 0")
    p.add_argument("--method", "-m", default="deeplift", choices=list(METHODS), metavar="METHOD",
                   help=f"one of {', '.join(METHODS)} (default: deeplift)")
    p.add_argument("--output", metavar="TENSOR", default=None,
                   help="tensor to explain (default: the model's only output)")
    p.add_argument("--n-steps", type=_positive_int, default=50, metavar="S",
                   help="integration steps for integrated_gradients (default: 50)")
    p.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                   help="samples per pass (default: 128; on a terminal ~N/10 so the progress bar moves)")
    p.add_argument("--precision", choices=["model", "float64"], default="model",
                   help="float64: run the whole graph in double precision (default: the model's)")
    p.add_argument("--max-rule", choices=["cross_max", "paper"], default="cross_max",
                   help="DeepLIFT rule for max pooling (default: cross_max)")
    p.add_argument("--final-activation", choices=["strip", "keep"], default="strip",
                   help="explain a final softmax/sigmoid at its logits (strip, default) or as is")
    p.add_argument("--backend", choices=["numpy", "cupy", "auto"], default="numpy", help="default: numpy")
    p.add_argument("--engine", choices=["interpreter", "compiled"], default="interpreter",
                   help="compiled: each pass as one ONNX graph in one onnxruntime session, built on the "
                        "first batch (the same attributions to 1e-6; faster on transformers and "
                        "recurrent nets); default: interpreter")
    p.add_argument("--out", "-o", required=True, metavar="FILE.npz", help="where to write the attributions")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="also draw the first sample's attributions")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("check", formatter_class=fmt, epilog=CHECK_EPILOG,
                       help="check every rule's summation-to-delta and the forward vs onnxruntime",
                       description="Check DeepLIFT's summation-to-delta at every node (random output "
                                   "multipliers) and liftir's forward against onnxruntime.")
    p.add_argument("model", metavar="MODEL", help="ONNX model file")
    p.add_argument("--input", "-i", metavar="FILE", default=None,
                   help="inputs (.npy/.npz); default: standard normal of the declared shapes")
    p.add_argument("--baseline", "-b", metavar="B", default=None,
                   help="reference input: zeros (default), a number, or a .npy/.npz")
    p.add_argument("--samples", "-n", type=_positive_int, default=8, metavar="N",
                   help="batch size of generated inputs (default: 8)")
    p.add_argument("--rtol", type=_positive_float, default=1e-4, metavar="R",
                   help="tolerance on |residual| / sum|terms| (default: 1e-4)")
    p.add_argument("--max-rule", choices=["cross_max", "paper"], default="cross_max",
                   help="DeepLIFT rule for max pooling (default: cross_max)")
    p.add_argument("--output", metavar="TENSOR", default=None, help="tensor to seed (default: every model output)")
    p.add_argument("--final-activation", choices=["keep", "strip"], default="keep",
                   help="check a final softmax/sigmoid rule too (keep, default) or seed its logits")
    p.add_argument("--precision", choices=["model", "float64"], default="model",
                   help="float64: check the graph run in double precision (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("ops", formatter_class=fmt, epilog=OPS_EPILOG,
                       help="list op types with rules, or a model's coverage",
                       description="List the op types liftir has rules for, or whether MODEL can "
                                   "be explained: its op types' coverage, then every rule run once "
                                   "(exit 2 if explain would refuse the model).")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None, help="ONNX model file (optional)")
    p.add_argument("--method", "-m", default="deeplift", choices=list(METHODS), metavar="METHOD",
                   help=f"one of {', '.join(METHODS)} (default: deeplift)")
    p.add_argument("--input", "-i", metavar="FILE", default=None,
                   help="inputs (.npy/.npz) to run the rules on; default: standard normal of the "
                        "declared shapes")
    p.add_argument("--output", metavar="TENSOR", default=None,
                   help="tensor explain would explain (default: every float model output)")
    p.set_defaults(func=cmd_ops, max_rule="cross_max")

    p = sub.add_parser("compile", formatter_class=fmt,
                       help="write the explainer as a standalone ONNX model (served without liftir)",
                       description="Write the explainer (forward, multiplier pass and attributions) as one "
                                   "ONNX model: inputs the model's inputs (batch --batch-size) and, for "
                                   "reference methods, NAME_baseline (one row; one per sample for token-id models); outputs NAME_attribution "
                                   "and, for DeepLIFT, delta.")
    p.add_argument("model", metavar="MODEL", help="ONNX model file")
    p.add_argument("--method", "-m", default="deeplift", choices=list(METHODS), metavar="METHOD",
                   help=f"one of {', '.join(METHODS)} (default: deeplift; compiled: deeplift, saliency, "
                        f"input_x_gradient, guided_backprop, deconvnet)")
    p.add_argument("--target", "-t", metavar="T", default=None,
                   help="INT: one class for every sample; i,j,... or 'all': several classes")
    p.add_argument("--batch-size", type=_positive_int, default=1, metavar="N",
                   help="samples per call of the exported model (default: 1)")
    p.add_argument("--shape", action="append", metavar="NAME=D1,D2",
                   help="an input's per-sample shape where the model leaves it open (repeatable), "
                        "e.g. --shape input_ids=128")
    p.add_argument("--output", metavar="TENSOR", default=None,
                   help="tensor to explain (default: the model's only output)")
    p.add_argument("--max-rule", choices=["cross_max", "paper"], default="cross_max",
                   help="DeepLIFT rule for max pooling (default: cross_max)")
    p.add_argument("--final-activation", choices=["strip", "keep"], default="strip",
                   help="explain a final softmax/sigmoid at its logits (strip, default) or as is")
    p.add_argument("--out", "-o", required=True, metavar="FILE.onnx", help="where to write the explainer")
    p.set_defaults(func=cmd_compile)

    from .genome.cli import add_parser as add_genome_parser  # noqa: PLC0415 - its own module
    add_genome_parser(sub, _positive_int, fmt)
    return parser


def _resolve_examples(args) -> None:
    """`example:NAME` arguments name the model and inputs shipped in liftir.data."""
    from .data import resolve
    if getattr(args, "model", None):
        args.model = resolve(args.model, ".onnx")
    for field in ("input", "baseline"):
        if getattr(args, field, None):
            setattr(args, field, resolve(getattr(args, field), ".npy"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `liftir` command; returns the exit code (never raises SystemExit)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or an argparse usage error (code 2)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        _resolve_examples(args)
        return args.func(args)
    except (LiftirError, CLIError) as exc:
        message = str(exc)
        if "pass output=" in message:  # the API's wording; say what the command line needs
            message += " (on the command line: --output NAME)"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
