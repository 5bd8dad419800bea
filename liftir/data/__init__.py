"""Example models and inputs shipped with liftir, addressed as `example:NAME`.

`digits`: an All-Conv net trained on scikit-learn's 8x8 digits (digits.onnx) and 16
held-out digits to explain (digits.npy); made by examples/shipped/make_digits_example.py.

The name is resolved here and nowhere else: `Explainer("example:digits")`, the CLI's
`MODEL` and `--input`, and `Explainer.attribute("example:digits", ...)` all go through
`resolve`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PREFIX = "example:"


def examples() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.onnx"))


def is_example(argument: Any) -> bool:
    return isinstance(argument, str) and argument.startswith(PREFIX)


def resolve(argument: Any, suffix: str) -> Any:
    """`example:NAME` -> the packaged NAME<suffix>; any other argument unchanged."""
    if not is_example(argument):
        return argument
    name = argument[len(PREFIX):]
    path = HERE / f"{name}{suffix}"
    if not name or "/" in name or "\\" in name or not path.is_file():
        from ..errors import InputError
        raise InputError(f"no shipped example {argument!r}; available: "
                         f"{', '.join(PREFIX + e for e in examples())}")
    return str(path)


def resolve_model(argument: Any) -> Any:
    """`example:NAME` -> path of the shipped model; anything else unchanged."""
    return resolve(argument, ".onnx")


def resolve_input(argument: Any) -> Any:
    """`example:NAME` -> the shipped inputs as an array; anything else unchanged."""
    if not is_example(argument):
        return argument
    import numpy as np
    return np.load(resolve(argument, ".npy"), allow_pickle=False)
