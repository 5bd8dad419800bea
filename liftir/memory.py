"""How many rows and targets one pass may take so that it stays under a memory budget.

A pass of the interpreter keeps every activation of its forward for the backward, and
during the backward holds multipliers shaped (K targets, rows, ...) for the tensors in
flight. Both grow linearly in rows, the second also in K, so the memory of a pass is
about ``rows * (activation + K * multiplier)`` bytes, with the per-row sizes measured
on a one-row forward of the plan (`RowCost.measure`). `plan_pass` picks the largest
rows-per-pass (and, when even one row with every target does not fit, the largest
targets-per-pass) under the budget. Results never depend on the choice: rows are
independent samples, targets independent seeds.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from .errors import InputError

#: the default budget of one pass: fixed (not a fraction of free RAM) so that the same call
#: is cut the same way on every machine. 1 GiB fits a laptop, and larger passes were not
#: faster: DeepLIFT-SHAP on a BPNet-like model took 10-16 s in passes of 0.4 to 2 GiB and
#: 20-23 s in one 2.4 GiB pass, on a shared 2-core machine (benchmarks/bench_memory.py).
DEFAULT_MAX_MEMORY = 1024 ** 3

#: multiplier arrays alive at once during the backward, in units of the largest tensor:
#: the one arriving, the one leaving, and a rule's temporaries (e.g. m * (x - x0)).
MULTIPLIERS_IN_FLIGHT = 4

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


class MemoryBudgetWarning(UserWarning):
    """max_memory is smaller than one row (one sample, one target) of a pass needs."""


def parse_memory(value) -> int | None:
    """Bytes from an int or a string such as "512MiB", "2GB" or "1.5 GiB"; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InputError(f"max_memory must be bytes (an int), a string like '2GiB', or None; got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise InputError(f"max_memory {value!r} is not a size; write e.g. 2GiB, 512MiB, 1e9 or an int of bytes")
        number = float(match.group(1)) * _UNITS[match.group(2).lower()]
    else:
        raise InputError(f"max_memory must be bytes (an int), a string like '2GiB', or None; got {value!r}")
    if not number > 0:
        raise InputError(f"max_memory must be positive, got {value!r}")
    return int(number)


@dataclass(frozen=True)
class RowCost:
    """Bytes one forward row of the plan keeps (all activations), and the largest tensor of a row."""

    activations: int
    largest: int

    @classmethod
    def measure(cls, values: dict, rows: int) -> "RowCost":
        """From the activations of a forward over `rows` rows (all of them: an exporter may
        move the batch off axis 0, and what does not grow with the rows is small)."""
        batched = [v for v in values.values() if getattr(v, "ndim", 0)]
        total = sum(int(v.nbytes) for v in batched)
        largest = max((int(v.nbytes) for v in batched), default=0)
        return cls(max(1, total // rows), max(1, largest // rows))


@dataclass(frozen=True)
class PassSize:
    """Rows (samples, pairs or integration points, by method) and targets one pass takes."""

    rows: int
    targets: int
    #: the estimated bytes of a full pass of this size
    estimate: int
    #: what a row is: "sample", "pair" (DeepLIFT-SHAP) or "point of the path" (integrated gradients)
    unit: str = "sample"
    #: how many passes the call made
    passes: int = 1


def plan_pass(budget: int | None, cost: RowCost, rows: int, targets: int, *, forward_rows: float = 1.0,
              fixed_rows: float = 0.0, multiplier_factor: float = 1.0, what: str = "row") -> PassSize:
    """The largest pass under `budget` bytes.

    A pass of r rows and k targets is estimated as
    ``(fixed_rows + r * forward_rows) * activations + r * k * MULTIPLIERS_IN_FLIGHT * largest
    * multiplier_factor``: `forward_rows` forward rows per row of work (e.g. 2 for a sample
    with its own reference), `fixed_rows` shared by the pass (a shared reference), and
    `multiplier_factor` for methods that carry two multipliers (RevealCancel).
    Rows shrink first (all targets kept together), then targets. When not even one row
    and one target fit, one of each is used and a MemoryBudgetWarning says so.
    """
    def estimate(r: int, k: int) -> int:
        return int((fixed_rows + r * forward_rows) * cost.activations
                   + r * k * MULTIPLIERS_IN_FLIGHT * cost.largest * multiplier_factor)

    if budget is None:
        return PassSize(rows, targets, estimate(rows, targets))
    per_row_all_targets = estimate(1, targets) - estimate(0, targets)
    room = budget - estimate(0, targets)
    if room >= per_row_all_targets:
        r = min(rows, room // per_row_all_targets)
        return PassSize(int(r), targets, estimate(int(r), targets))
    per_target = estimate(1, 1) - estimate(1, 0)
    k = int((budget - estimate(1, 0)) // per_target) if budget > estimate(1, 0) else 0
    if k >= 1:
        return PassSize(1, min(k, targets), estimate(1, min(k, targets)))
    warnings.warn(f"max_memory={budget} bytes is less than one {what} with one target needs "
                  f"(about {estimate(1, 1)} bytes); running one {what} and one target per pass",
                  MemoryBudgetWarning, stacklevel=4)
    return PassSize(1, 1, estimate(1, 1))
