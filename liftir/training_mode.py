"""Refuse graphs exported in training mode, up front.

A Dropout in training mode draws random masks and a BatchNormalization in training mode
normalizes by the batch's own statistics: neither is a fixed function of one sample, so
onnxruntime's forward and the rules' disagree and no attribution can conserve. Export in
eval mode (`model.eval()` before `torch.onnx.export`).
"""
from __future__ import annotations

import numpy as np

from .errors import ModelLoadError
from .graph import Graph


def _dropout_trains(graph: Graph, node) -> bool:
    if node.opset < 12 or len(node.inputs) < 3 or not node.inputs[2]:
        return False  # before opset 12 Dropout is an identity at inference
    value = graph.constants.get(node.inputs[2])
    return value is None or bool(np.asarray(value).any())  # a mode chosen at run time may train


def _batchnorm_trains(node) -> bool:
    if node.attrs.get("training_mode", 0):
        return True
    # opsets 9-13 compute the running statistics (outputs 2-5) only in training
    return node.opset < 14 and any(node.outputs[1:])


def refuse_training_mode(graph: Graph) -> None:
    """Raise ModelLoadError naming every Dropout / BatchNormalization node in training mode."""
    bad = [f"{node.name!r} ({node.op_type})" for node in graph.nodes.values() if node.domain == "" and (
        (node.op_type == "Dropout" and _dropout_trains(graph, node))
        or (node.op_type == "BatchNormalization" and _batchnorm_trains(node)))]
    if bad:
        raise ModelLoadError(f"the model is in training mode at {', '.join(bad)}: training-mode Dropout "
                             f"draws random masks and BatchNormalization uses batch statistics, so no "
                             f"attribution can conserve; export the model in eval mode (model.eval())")
