"""When a run has quarantined too much to be bad data: a systematic error, not bad rows.

A few bad rows are quarantined with their reason and the run goes on. A run that writes
nothing, or quarantines more than `max_fraction` of its input, stops with the reasons
counted instead of exiting 0 with an empty dataset (a wrong image root, a model that fails
on every row and a broken reader all look like that).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any


class QuarantineError(RuntimeError):
    """Too many rows were quarantined; the message counts the top reasons."""


def reason_kind(reason: str) -> str:
    """A reason with row-specific details masked, so the same failure counts as one kind:
    quoted text, paths/URIs and numbers become placeholders."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", reason)
    text = re.sub(r"(s3://|/)[^\s,;)]+", "<path>", text)
    return re.sub(r"\d+(\.\d+)?", "N", text)[:200]


def top_reasons(entries: Iterable[Mapping[str, Any]], n: int = 3) -> list[tuple[str, int]]:
    """The n most common reason kinds of quarantine entries ({id, reason, ...}), with counts."""
    return Counter(reason_kind(str(e.get("reason", ""))) for e in entries).most_common(n)


def check(
    what: str,
    total: int,
    quarantined: list[Mapping[str, Any]],
    max_fraction: float,
    usable: int | None = None,
) -> None:
    """Raise QuarantineError when nothing is usable (`usable` == 0, or every row
    quarantined) or the quarantined share of `total` input rows exceeds `max_fraction`
    (1.0 = only an empty result fails)."""
    bad = len(quarantined)
    if total <= 0:
        raise QuarantineError(f"{what}: no input rows")
    share = bad / total
    if bad < total and share <= max_fraction and usable != 0:
        return
    reasons = "; ".join(f"{count} x {kind}" for kind, count in top_reasons(quarantined))
    if bad >= total:
        verdict = "every row quarantined"
    elif share > max_fraction:
        verdict = f"{bad} of {total} rows ({share:.0%}) quarantined, above the allowed"
        verdict += f" {max_fraction:.0%}"
    else:
        verdict = f"no usable row written ({bad} of {total} quarantined)"
    raise QuarantineError(
        f"{what}: {verdict} — a systematic error, not bad data. Top reasons: {reasons or 'none'}"
    )
