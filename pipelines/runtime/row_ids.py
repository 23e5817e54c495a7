"""Ids and seeds of input rows, the same for generation and encoding."""

from __future__ import annotations

import hashlib

MAX_SEED = 2**63 - 1


def position_id(row: int) -> str:
    """The id of a row without one: its position in the input (files in sorted order)."""
    return f"{row:09d}"


def derived_seed(run_seed: int, row_id: str) -> int:
    """A row's seed from the run's seed and its id: stable, and independent of batching."""
    return int.from_bytes(hashlib.sha256(f"{run_seed}:{row_id}".encode()).digest()[:8], "big") & MAX_SEED
