"""Example models and inputs shipped with liftir, addressed as `example:NAME`.

`digits`: an All-Conv net trained on scikit-learn's 8x8 digits (digits.onnx) and 16
held-out digits to explain (digits.npy); made by examples/shipped/make_digits_example.py.
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
PREFIX = "example:"


def examples() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.onnx"))


def resolve(argument: str, suffix: str) -> str:
    """`example:NAME` -> the packaged NAME<suffix>; any other argument unchanged."""
    if not isinstance(argument, str) or not argument.startswith(PREFIX):
        return argument
    name = argument[len(PREFIX):]
    path = HERE / f"{name}{suffix}"
    if not path.is_file():
        from ..errors import InputError
        raise InputError(f"no shipped example {argument!r}; available: "
                         f"{', '.join(PREFIX + e for e in examples())}")
    return str(path)
