"""The README's supported-ops table, generated from the registry.

`python -m liftir.docs` prints it; `python -m liftir.docs --write README.md` rewrites the
block between the OPS markers. A test fails when the README's table is stale.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from .methods import METHODS
from .registry import registered_ops

START, END = "<!-- OPS:START -->", "<!-- OPS:END -->"
COLUMNS = ("deeplift", "saliency", "guided_backprop", "deconvnet")


def ops_markdown() -> str:
    """One row per op type: its rule family and the rule used by each method's mode."""
    rows = ["| op | rules/ module | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for (domain, op), rule in registered_ops().items():
        name = f"{domain}::{op}" if domain else op
        cells = [rule.describe(METHODS[m].mode) if rule.supports(METHODS[m].mode) else "—" for m in COLUMNS]
        family = type(rule).__module__.rsplit(".", 1)[-1]
        rows.append(f"| {name} | {family} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def replace_block(text: str, block: str) -> str:
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    return pattern.sub(lambda _: f"{START}\n{block}\n{END}", text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Print or write the supported-ops table.")
    parser.add_argument("--write", type=Path, help="rewrite the OPS block of this file (README.md)")
    args = parser.parse_args(argv)
    table = ops_markdown()
    if args.write:
        args.write.write_text(replace_block(args.write.read_text(), table))
    else:
        print(table)


if __name__ == "__main__":
    main()
