"""Regions to explain: a BED / narrowPeak file turned into fixed-width windows.

A BED line is checked as it is read, and a problem names the file and the line, so a
user can fix it. Windows are centred on the peak summit when the file has one
(narrowPeak column 10) and on the interval's midpoint otherwise, as ChromBPNet and
tangermeme do. A window that falls off a chromosome end is not an error of the file:
it is skipped and reported (or padded with N, on request).
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

EDGE_POLICIES = ("skip", "pad")


@dataclass
class Regions:
    """Fixed-width windows, one per BED record, in file order.

    ``index`` is the record's position among the file's records (0-based, comments and
    headers excluded): the per-region reference seed uses it, so a region's references
    do not depend on which other regions were kept.
    """
    chrom_names: list[str]
    chrom: np.ndarray        # int32 code into chrom_names
    start: np.ndarray        # int64 window start (0-based, may be < 0 when padded)
    end: np.ndarray          # int64 window end (exclusive)
    line: np.ndarray         # int64 1-based line of the record in its file
    index: np.ndarray        # int64 record index (seeds)
    skipped_lines: list[int] = field(default_factory=list)  # windows off a chromosome end

    def __len__(self) -> int:
        return len(self.chrom)

    def subset(self, lo: int, hi: int) -> "Regions":
        return Regions(self.chrom_names, self.chrom[lo:hi], self.start[lo:hi], self.end[lo:hi],
                       self.line[lo:hi], self.index[lo:hi], [])


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="ascii", errors="replace")
    return open(path, encoding="ascii", errors="replace")


def read_bed(path, width: int, chrom_sizes: dict[str, int], edge: str = "skip") -> Regions:
    """Fixed-width windows for the records of a BED (3+ columns) or narrowPeak file.

    Parameters
    ----------
    path : BED or narrowPeak file (plain or .gz). Lines starting with '#', 'track' or
        'browser' are headers. A 10th column >= 0 is the summit offset from the start.
    width : window width in bp, centred on the summit (or midpoint).
    chrom_sizes : chromosome -> length, from the FASTA: a record on a chromosome the
        FASTA lacks, or extending past its end, is an error naming the line.
    edge : "skip" (default) drops windows that fall off a chromosome end, listing their
        lines in ``skipped_lines``; "pad" keeps them, the missing bases read as N.
    """
    if edge not in EDGE_POLICIES:
        raise InputError(f"edge must be one of {EDGE_POLICIES}, got {edge!r}")
    if not isinstance(width, (int, np.integer)) or width < 1:
        raise InputError(f"width must be a positive int, got {width!r}")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"BED file {str(path)!r} does not exist")
    names = list(chrom_sizes)
    codes = {name: i for i, name in enumerate(names)}
    chrom, start, end, lines = [], [], [], []
    skipped: list[int] = []
    n_records = 0
    kept_index = []
    with _open_text(path) as handle:
        for number, raw in enumerate(handle, start=1):
            text = raw.rstrip("\n\r")
            if not text.strip() or text.startswith(("#", "track", "browser")):
                continue
            cols = text.split("\t")
            where = f"{path.name}, line {number}"
            if len(cols) < 3:
                raise InputError(f"{where}: a BED line needs at least 3 tab-separated columns "
                                 f"(chrom, start, end), got {len(cols)}: {text[:80]!r}")
            name = cols[0]
            try:
                lo, hi = int(cols[1]), int(cols[2])
            except ValueError:
                raise InputError(f"{where}: start and end must be integers, got "
                                 f"{cols[1]!r} and {cols[2]!r}") from None
            if lo < 0 or hi <= lo:
                raise InputError(f"{where}: need 0 <= start < end, got start {lo}, end {hi}")
            if name not in codes:
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise InputError(f"{where}: chromosome {name!r} is not in the FASTA (it has {shown})")
            if hi > chrom_sizes[name]:
                raise InputError(f"{where}: region {name}:{lo}-{hi} extends past the end of "
                                 f"{name} (length {chrom_sizes[name]})")
            centre = lo + (hi - lo) // 2
            if len(cols) >= 10 and cols[9] not in ("", "."):
                try:
                    summit = int(cols[9])
                except ValueError:
                    raise InputError(f"{where}: narrowPeak column 10 (summit offset) must be an "
                                     f"integer, got {cols[9]!r}") from None
                if summit >= 0:
                    if summit >= hi - lo:
                        raise InputError(f"{where}: summit offset {summit} lies outside the peak "
                                         f"{name}:{lo}-{hi}")
                    centre = lo + summit
            w_lo = centre - width // 2
            w_hi = w_lo + width
            record = n_records
            n_records += 1
            if (w_lo < 0 or w_hi > chrom_sizes[name]) and edge == "skip":
                skipped.append(number)
                continue
            chrom.append(codes[name])
            start.append(w_lo)
            end.append(w_hi)
            lines.append(number)
            kept_index.append(record)
    if n_records == 0:
        raise InputError(f"BED file {str(path)!r} has no regions")
    return Regions(names, np.asarray(chrom, np.int32), np.asarray(start, np.int64),
                   np.asarray(end, np.int64), np.asarray(lines, np.int64),
                   np.asarray(kept_index, np.int64), skipped)
