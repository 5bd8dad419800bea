"""Genome-scale attribution: every region of a BED on a FASTA, streamed to a Zarr store.

One module per job: `regions` (BED/narrowPeak -> fixed-width windows), `sequences`
(indexed FASTA or one-hot arrays -> one-hot chunks), `references` (per-region shuffles
and the other reference kinds), `attribution` (actual and hypothetical scores of a
chunk), `store` (the Zarr layout, restart markers, the TF-MoDISco export), `pipeline`
(the driver) and `dask_driver` (the same tasks on a Dask cluster). Needs the `genome`
extra (pyfaidx, zarr, dask[distributed]); `import liftir` does not.
"""
from __future__ import annotations

from .pipeline import Summary, explain_genome
from .store import export_modisco, open_store

__all__ = ["explain_genome", "export_modisco", "open_store", "Summary"]
