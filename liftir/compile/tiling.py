"""Run a compiled pass's chains of elementwise ops over large tensors chunk by chunk, so that
their intermediates stay in the CPU's cache.

onnxruntime's CPU provider fuses no elementwise ops: a rule's arithmetic over a large tensor
(a gate's Rescale over every step of a recurrent net) is a chain of passes, each reading
and writing the whole tensor through memory. Measured on a chain of 12 binary and unary
ops over 1.2M float32 (onnxruntime 1.32, one thread, a 2-core AVX-512 Xeon VM): 6.2 ms
whole, 3.6 ms in 16 chunks of 77K elements (each op 500 against 235 us; each tensor
entering or leaving the chain ~250 us for its Slice or Concat). So a connected set of such
ops whose frames share the axes up to a chunk axis (a region) is rewritten into one copy
per chunk along that axis: inputs with the axis are sliced, smaller ones (broadcast along
it) are read whole, and each value read outside the region is concatenated back. Each
chunk's ops are element for element the same arithmetic (reductions keep their rows whole),
so the values are the same bits.

onnxruntime orders execution by a depth-first walk from the graph's leaves, so the copies of
one chunk run together and their intermediates are reused from the cache. Only one-thread
sessions are tiled (`CompiledPass.tiled_form`): with two threads per chunk the nodes'
overhead ate the gain. Whether the tiled form beats the graph as compiled depends on the
CPU (tiled, a Xeon's recurrent passes took 0.89x the time, an EPYC's 1.05-1.08x): a pass called in a loop runs both
and keeps the faster (liftir/compile/forms.py). The bodies of If nodes are left alone: tiling a softmax's branch
(an Enformer-style attention, 4.2M scores) ran no faster and its session took 2-5 s to build.
"""
from __future__ import annotations

import collections
import itertools
import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .tracer import node_reads

#: ops whose every output element depends only on the same element of its (broadcast) inputs
ELEMENTWISE = frozenset({
    "Abs", "Neg", "Exp", "Log", "Tanh", "Sigmoid", "Sqrt", "Reciprocal", "Relu", "Floor", "Ceil",
    "Round", "Sign", "Erf", "Not", "IsNaN", "IsInf", "Cast", "Identity", "Sin", "Cos",
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Equal", "Less", "Greater",
    "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Where", "BitwiseAnd", "BitwiseOr",
})
#: reductions that stay within a chunk when their axes leave out the chunk's axis, over the
#: trailing axes only: onnxruntime sums those row by row with one loop whatever the rows'
#: count, but picks its loop for other axes by the shape (a chunk with one leading row turns
#: [k, r, n] summed over r into [r, n] summed over its first axis), so a middle axis summed
#: in chunks came out in another order (found by tests/test_tiling.py's random wiring)
REDUCTIONS = frozenset({"ReduceSum", "ReduceMax", "ReduceMin", "ReduceMean", "ReduceProd"})

#: elements per chunk: several live intermediates of this size (float32: 192 KiB each) fit in
#: a core's L2 cache (2 MiB on this Xeon, 512 KiB on an EPYC's Zen core with L3 behind)
CHUNK_ELEMENTS = 48 * 1024
#: a region is tiled when that saves this many passes over its largest frame (`_Plan.gain`):
#: measured, regions estimated to save one pass or less (a Relu's five-op Rescale over a
#: conv's 3M activations, a LayerNorm backward's eight) ran no faster
MIN_GAIN = 2.0
#: frames smaller than this many chunks already stay in a core's L2 cache between passes
MIN_CHUNKS = 6

logger = logging.getLogger("liftir")


def tiled_model(model, shapes: dict[str, tuple[int, ...] | None], chunk_elements: int | None = None):
    """A copy of `model` (a compiled pass) with its elementwise regions tiled; `shapes`: the
    values' shapes as the tracer and the probe forward knew them (None: unknown);
    `chunk_elements`: default CHUNK_ELEMENTS."""
    chunk_elements = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    known = {k: tuple(v) for k, v in shapes.items() if v is not None}
    constants = {}
    for init in model.graph.initializer:
        known.setdefault(init.name, tuple(init.dims))
        if init.data_type == onnx.TensorProto.INT64 and len(init.dims) <= 1:
            constants[init.name] = numpy_helper.to_array(init)
    taken = ({o for node in model.graph.node for o in node.output} | set(known)
             | {i.name for i in model.graph.input})
    counter = itertools.count()

    def fresh(hint):
        while True:
            name = f"liftir/{hint}{next(counter)}"
            if name not in taken:
                return name

    nodes = tile_for_cache(list(model.graph.node), known, {o.name for o in model.graph.output}, constants,
                           fresh, chunk_elements)
    tiled = onnx.ModelProto()
    tiled.CopyFrom(model)
    del tiled.graph.node[:]
    tiled.graph.node.extend(nodes)
    return tiled


def tile_for_cache(nodes: list, shapes: dict[str, tuple[int, ...]], kept: set[str],
                   constants: dict[str, np.ndarray], fresh, chunk_elements: int) -> list:
    """`nodes` (topologically ordered, the graph's body) with every region of elementwise ops
    that pays (`_Plan.gain`) rewritten chunk by chunk. `shapes`: the values' shapes (nodes
    reading or writing a value without one are left alone); `kept`: names read outside
    `nodes` (graph outputs); `constants`: int64 initializers by name (a reduction's axes);
    `fresh(hint)`: new unique names. Slice bounds are Constant nodes among the result."""
    frames = {i: f for i, f in ((i, _frame(node, shapes, constants)) for i, node in enumerate(nodes))
              if f is not None}
    keys = _region_keys(frames, chunk_elements)
    readers = _Readers(nodes)
    replaced: dict[int, list] = {}
    skipped: set[int] = set()
    for members in (part for region in _regions(nodes, keys) for part in _ordered_parts(region, readers)):
        plan = _Plan(nodes, members, keys[members[0]], frames, shapes, readers, kept, chunk_elements)
        logger.debug("tiling: region of %d nodes over %s, gain %.2f passes", len(members), keys[members[0]],
                     plan.gain)
        if plan.gain < MIN_GAIN:
            continue
        replaced[members[-1]] = plan.emit(fresh)
        skipped.update(members)
    out = []
    for index, node in enumerate(nodes):
        if index in replaced:
            out.extend(replaced[index])
        elif index not in skipped:
            out.append(node)
    return out


class _Readers(collections.defaultdict):
    """Value name -> positions of the nodes reading it; `outputs[i]`: node i's outputs."""

    def __init__(self, nodes):
        super().__init__(set)
        self.outputs = [list(node.output) for node in nodes]
        for index, node in enumerate(nodes):
            for name in node_reads(node):
                self[name].add(index)


def _frame(node, shapes, constants):
    """(frame shape, reduced axes) of a node that may join a region, else None: an elementwise
    op's broadcast shape, a reduction's input shape; leading 1s left out."""
    if node.op_type not in ELEMENTWISE and node.op_type not in REDUCTIONS:
        return None
    if any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute):
        return None
    ins = [i for i in node.input if i]
    if not ins or any(i not in shapes for i in ins) or any(o not in shapes for o in node.output):
        return None
    if node.op_type in REDUCTIONS:
        frame = tuple(shapes[ins[0]])
        axes = _reduced_axes(node, constants, len(frame))
        if axes is None or axes != tuple(range(len(frame) - len(axes), len(frame))):
            return None  # not the trailing axes: see REDUCTIONS
    else:
        try:
            frame = tuple(np.broadcast_shapes(*(tuple(shapes[i]) for i in ins)))
        except ValueError:
            return None
        if tuple(shapes[node.output[0]]) != frame:
            return None
        axes = ()
    while len(frame) > 1 and frame[0] == 1:  # [1, n, ...] and [n, ...] are one frame
        frame = frame[1:]
        axes = tuple(a - 1 for a in axes if a > 0)
    return frame, axes


def _region_keys(frames, chunk_elements):
    """Each candidate's region key (the frame's axes up to the chunk axis, the number of axes
    after it). A large frame (MIN_CHUNKS chunks or more) picks its chunk axis; a smaller one (a
    softmax's row statistics, [.., rows, 1] beside [.., rows, cols]) joins a key whose
    leading axes it shares, so that the rows' arithmetic does not cut the region."""
    keys, large = {}, set()
    for index, (frame, axes) in frames.items():
        size = int(np.prod(frame)) if frame else 1
        if size < MIN_CHUNKS * chunk_elements:
            continue
        axis = _chunk_axis(frame, size, chunk_elements)
        if axis is not None and axis not in axes:
            keys[index] = (frame[:axis + 1], len(frame) - axis - 1)
            large.add(keys[index])
    for index, (frame, axes) in frames.items():
        if index in keys:
            continue
        for prefix, trailing in large:
            if (len(frame) == len(prefix) + trailing and frame[:len(prefix)] == prefix
                    and len(prefix) - 1 not in axes):
                keys[index] = (prefix, trailing)
                break
    return keys


def _reduced_axes(node, constants, rank):
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("keepdims", 1) != 1:
        return None
    if len(node.input) > 1 and node.input[1]:
        if node.input[1] not in constants:
            return None
        axes = [int(a) for a in np.asarray(constants[node.input[1]]).reshape(-1)]
    else:
        axes = list(attrs.get("axes", []))
    if not axes:  # every axis (noop_with_empty_axes aside): the chunk's axis too
        return None
    return tuple(sorted(a % rank for a in axes))


def _chunk_axis(frame, size, chunk_elements):
    """The outermost axis with at least as many entries as the frame has chunks (slices of
    an outer axis are contiguous), else the longest; None for a frame with no axis > 1."""
    wanted = -(-size // chunk_elements)
    for axis, extent in enumerate(frame):
        if extent >= wanted:
            return axis
    longest = max(range(len(frame)), key=lambda a: frame[a]) if frame else None
    return longest if longest is not None and frame[longest] > 1 else None


def _regions(nodes, keys):
    """Connected sets of candidate nodes with one key, joined by the values they pass."""
    parent = {i: i for i in keys}

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    producer = {o: i for i, node in enumerate(nodes) for o in node.output}
    for index in keys:
        for name in nodes[index].input:
            at = producer.get(name)
            if at in keys and keys[at] == keys[index]:
                parent[find(at)] = find(index)
    groups = collections.defaultdict(list)
    for index in keys:
        groups[find(index)].append(index)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def _ordered_parts(members, readers):
    """The region cut into runs that each end before any node outside the region reads one
    of the run's values: a run is emitted at its last node's place, and that outside node
    may feed a later member (a total over the region's values that flows back into it)."""
    inside = set(members)
    parts, part, deadline = [], [], np.inf
    for index in members:  # in topological order
        if index > deadline:
            parts.append(part)
            part, deadline = [], np.inf
        part.append(index)
        readers_outside = {r for name in readers.outputs[index] for r in readers[name]} - inside
        deadline = min([deadline, *readers_outside])
    parts.append(part)
    return [p for p in parts if len(p) > 1]


class _Plan:
    """How one region is cut: which values are sliced, shared or concatenated, and whether
    cutting it pays."""

    def __init__(self, nodes, members, key, frames, shapes, readers, kept, chunk_elements):
        self.nodes, self.members, self.shapes = nodes, members, shapes
        prefix, trailing = key
        self.rank, self.axis, extent = len(prefix) + trailing, len(prefix) - 1, prefix[-1]
        sizes = [int(np.prod(frames[i][0])) for i in members]
        largest = max(sizes)
        count = min(extent, -(-largest // chunk_elements))
        edges = np.linspace(0, extent, count + 1).round().astype(int)
        self.bounds = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]
        inside = set(members)
        made = {o for i in members for o in nodes[i].output}
        self.sliced = list(dict.fromkeys(n for i in members for n in nodes[i].input
                                         if n and n not in made and self._local_axis(n) is not None))
        self.leaving = [o for i in members for o in nodes[i].output if o in kept or readers[o] - inside]
        # in units of one pass over the largest frame, measured (module docstring): an op over
        # a chunk in cache costs about half its pass through memory, a value sliced or
        # concatenated about half a pass, and a small op copied per chunk its nodes' overhead
        passes = sum(sizes) / largest
        boundary = sum(int(np.prod(shapes[v])) for v in self.sliced + self.leaving) / largest
        small = sum(1 for size in sizes if 2 * size < largest)
        self.gain = 0.5 * passes - 0.5 * boundary - 0.2 * small

    def _local_axis(self, name):
        """The chunk axis in the value's own (right-aligned) shape, or None if broadcast."""
        shape = tuple(self.shapes[name])
        local = self.axis - (self.rank - len(shape))
        extent = self.bounds[-1][1]
        if local < 0 or shape[local] != extent:
            return None
        return local

    def emit(self, fresh):
        nodes, chunks, bounds = [], [], {}

        def bound(value):
            if value not in bounds:
                bounds[value] = _constant(nodes, fresh, [value])
            return bounds[value]

        for c, (start, stop) in enumerate(self.bounds):
            renamed = {}
            for name in self.sliced:
                axis = self._local_axis(name)
                piece = fresh("tile")
                nodes.append(helper.make_node(
                    "Slice", [name, bound(start), bound(stop), bound(axis)], [piece], name=fresh("tile/slice")))
                renamed[name] = piece
            for i in self.members:
                node = self.nodes[i]
                outs = []
                for o in node.output:
                    renamed[o] = fresh("tile")
                    outs.append(renamed[o])
                base = node.name or fresh("tile/node")  # unnamed nodes: names must be unique
                copy = helper.make_node(node.op_type, [renamed.get(n, n) for n in node.input], outs,
                                        name=f"{base}/chunk{c}", domain=node.domain)
                copy.attribute.extend(node.attribute)
                nodes.append(copy)
            chunks.append(renamed)
        for name in self.leaving:
            nodes.append(helper.make_node("Concat", [r[name] for r in chunks], [name],
                                          name=fresh("tile/concat"), axis=self._local_axis(name)))
        return nodes


def _constant(nodes, fresh, values):
    name = fresh("tile/bound")
    nodes.append(helper.make_node("Constant", [], [name], name=fresh("tile/const"),
                                  value=numpy_helper.from_array(np.asarray(values, np.int64))))
    return name
