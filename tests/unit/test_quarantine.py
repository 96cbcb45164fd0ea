"""The quarantine guard: a few bad rows pass, a systematic failure stops the run."""

from __future__ import annotations

import pytest

from mmalign import quarantine
from mmalign.quarantine import QuarantineError


def _bad(reason: str, n: int) -> list[dict]:
    return [{"id": f"r{i}", "reason": reason.format(i=i)} for i in range(n)]


def test_reasons_of_one_kind_count_together() -> None:
    entries = _bad("images: unreadable (FileNotFoundError: 's3://b/x/pref-{i}.png')", 5) + _bad(
        "prompt too long: {i} positions > 2048", 2
    )
    assert quarantine.top_reasons(entries) == [
        ("images: unreadable (FileNotFoundError: '…')", 5),
        ("prompt too long: N positions > N", 2),
    ]
    assert quarantine.reason_kind("cannot read /data/a/b.png now") == "cannot read <path> now"


def test_a_few_bad_rows_pass() -> None:
    quarantine.check("bdhs", 100, _bad("empty reference", 10), max_fraction=0.5)
    quarantine.check("bdhs", 100, _bad("empty reference", 50), max_fraction=0.5)


def test_most_rows_quarantined_fails_with_counted_reasons() -> None:
    entries = _bad("images: unreadable ('p{i}.png')", 58) + _bad("empty reference", 2)
    with pytest.raises(QuarantineError) as err:
        quarantine.check("bdhs.py", 100, entries, max_fraction=0.5)
    msg = str(err.value)
    assert msg.startswith(
        "bdhs.py: 60 of 100 rows (60%) quarantined, above the allowed 50% — a systematic error"
    )
    assert "58 x images: unreadable ('…'); 2 x empty reference" in msg


def test_nothing_usable_fails_even_when_any_share_is_allowed() -> None:
    with pytest.raises(QuarantineError, match="every row quarantined"):
        quarantine.check("x", 3, _bad("bad", 3), max_fraction=1.0)
    with pytest.raises(QuarantineError, match="no input rows"):
        quarantine.check("x", 0, [], max_fraction=1.0)


def test_a_run_that_writes_nothing_fails() -> None:
    with pytest.raises(QuarantineError, match=r"no usable row written \(1 of 4 quarantined\)"):
        quarantine.check("x", 4, _bad("bad", 1), max_fraction=0.5, usable=0)
    quarantine.check("x", 4, _bad("bad", 1), max_fraction=0.5, usable=3)


def test_check_batch_stops_on_one_error_over_most_of_a_batch() -> None:
    """More than max_share of a batch failing the same way (details masked) stops; a lone
    bad row, mixed errors, one-row batches and max_share 1.0 do not."""
    from mmalign.quarantine import SystematicFailure, check_batch, find_systematic

    same = [f"generation: IndexError: index {i} out of range" for i in range(3)]
    with pytest.raises(SystematicFailure, match=r"3 of 4 rows .* IndexError: index 0") as err:
        check_batch([*same, ""], 0.5, "BDHS (bdhs)")
    check_batch([same[0], "", "", ""], 0.5, "x")  # one bad row is bad data
    check_batch([same[0], "image: unreadable (OSError)", ""], 0.5, "x")  # 1 of 3 each
    check_batch([same[0]], 0.5, "x")  # one row tells nothing
    check_batch(same, 1.0, "x")  # never stop
    with pytest.raises(SystematicFailure):
        check_batch(same[:2], 0.5, "x")

    # found behind Ray's wrapping: in the cause chain, or as text of the remote traceback
    wrapped = RuntimeError("task failed")
    wrapped.__cause__ = err.value
    assert find_systematic(wrapped) == str(err.value)
    remote = RuntimeError("Traceback ...\nmmalign.quarantine.SystematicFailure: BDHS: 3 of 4")
    assert find_systematic(remote) == "BDHS: 3 of 4"
    assert find_systematic(ValueError("other")) is None
