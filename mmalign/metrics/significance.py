"""Exact significance of an accuracy count against chance (judges, reward models)."""

from __future__ import annotations

from math import comb


def binomial_tail(successes: int, trials: int, p: float = 0.5) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p): how likely a guesser of accuracy p
    gets at least `successes` of `trials` right."""
    return sum(
        comb(trials, k) * p**k * (1 - p) ** (trials - k) for k in range(successes, trials + 1)
    )
