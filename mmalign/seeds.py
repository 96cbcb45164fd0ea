"""Seed-mixing formulas: every derived seed of the project, in one place.

Pure integer arithmetic (no RNG state), so a seed depends only on its inputs, never on
batching, process or order. The constants are primes, which keeps neighbouring inputs
(seed, row, step) from colliding; changing one changes every run's randomness, so the
tests pin the values.
"""

from __future__ import annotations

import zlib

_SEED_MIX = 1_000_003
_STEP_MIX = 7_919
_EPOCH_MIX = 1009
_SEED_BITS = 2**63


def row_id_seed(seed: int, row_id: str) -> int:
    """Stable 63-bit seed of one row (offline BDHS): independent of batching and process."""
    return (seed * _SEED_MIX + zlib.crc32(row_id.encode())) % _SEED_BITS


def step_row_seed(seed: int, step: int, row_id: str) -> int:
    """Stable 63-bit seed of one row at one online loop step (online BDHS)."""
    return (seed * _SEED_MIX + step * _STEP_MIX + zlib.crc32(row_id.encode())) % _SEED_BITS


def sample_seed(seed: int, row: int, sample: int) -> int:
    """Seed of sample `sample` of row `row` of one sampling call (online samplers)."""
    return seed * _SEED_MIX + row * 101 + sample


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Shuffle seed of one learner worker's epoch."""
    return (seed * _SEED_MIX + epoch) * _EPOCH_MIX + rank
