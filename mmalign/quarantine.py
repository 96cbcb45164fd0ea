"""When a run has quarantined too much to be bad data: a systematic error, not bad rows.

A few bad rows are quarantined with their reason and the run goes on. A run that writes
nothing, or quarantines more than `max_fraction` of its input, stops with the reasons
counted instead of exiting 0 with an empty dataset (a wrong image root, a model that fails
on every row and a broken reader all look like that).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


class QuarantineError(RuntimeError):
    """Too many rows were quarantined; the message counts the top reasons."""


class SystematicFailure(RuntimeError):
    """Most rows of one batch failed with the same engine error: stop, do not quarantine."""


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


def check_batch(errors: Sequence[str], max_share: float, what: str) -> None:
    """Raise SystematicFailure when more than `max_share` of one batch's rows (at least 2)
    failed with the same kind of error (`errors`: one per row, "" = fine).

    One bad row is bad data; the same engine error on most of a batch (a wrong checkpoint,
    an unsupported architecture, a broken engine) would fail every batch after it too, so
    the job stops with that error instead of quarantining the whole dataset. 1.0 = never."""
    failed = [e for e in errors if e]
    if len(errors) < 2 or max_share >= 1.0 or not failed:
        return
    kind, count = Counter(reason_kind(e) for e in failed).most_common(1)[0]
    if count / len(errors) <= max_share:
        return
    example = next(e for e in failed if reason_kind(e) == kind)
    raise SystematicFailure(
        f"{what}: {count} of {len(errors)} rows of one batch failed with the same error, "
        f"above sampler.max_batch_errors {max_share:g} — a systematic failure, not bad data: "
        f"{example}"
    )


def find_systematic(err: BaseException) -> str | None:
    """The message of a SystematicFailure behind `err`, if any: in its cause chain, or in
    the text of a Ray error (Ray Data re-raises a worker's exception as a RayTaskError
    holding the remote traceback as text)."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, SystematicFailure):
            return str(cur).splitlines()[0] if str(cur) else type(cur).__name__
        found = re.search(r"SystematicFailure: (.+)", str(cur))
        if found:
            return found.group(1).strip()
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None
