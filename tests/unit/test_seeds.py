"""mmalign.seeds: the formulas the four call sites spelled out, pinned to their values."""

from __future__ import annotations

import zlib

from mmalign import online, seeds
from mmalign.engines.distributed_learner import epoch_seed
from operators.bdhs import row_seed


def test_seed_formulas_keep_their_values_on_cpu() -> None:
    crc = zlib.crc32(b"row-7")
    for seed in (0, 3, 2**40):
        assert seeds.row_id_seed(seed, "row-7") == (seed * 1_000_003 + crc) % 2**63
        assert seeds.step_row_seed(seed, 5, "row-7") == (seed * 1_000_003 + 5 * 7_919 + crc) % 2**63
        assert seeds.sample_seed(seed, 2, 1) == seed * 1_000_003 + 2 * 101 + 1
        assert seeds.epoch_seed(seed, 4, 3) == (seed * 1_000_003 + 4) * 1009 + 3
    # hand-computed: crc32(b"row-7") is fixed by the zlib spec
    assert seeds.row_id_seed(1, "row-7") == 1_000_003 + crc
    assert seeds.sample_seed(1, 0, 0) == 1_000_003 and seeds.epoch_seed(1, 0, 0) == 1_009_003_027


def test_call_sites_use_the_shared_formulas_on_cpu() -> None:
    assert row_seed(9, "a") == seeds.row_id_seed(9, "a")
    assert online.bdhs_row_seed(9, 2, "a") == seeds.step_row_seed(9, 2, "a")
    assert epoch_seed(9, 2, 1) == seeds.epoch_seed(9, 2, 1)
