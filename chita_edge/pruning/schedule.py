"""Sparsity schedules shared by CHITA++, block pruning and gradual pruning."""

from __future__ import annotations


def cubic_schedule(s: float, stages: int, s0: float = 0.1) -> list[float]:
    """s_t = s + (s0 - s)(1 - t/(T-1))^3, t = 0..T-1 (ends exactly at s)."""
    if stages <= 1 or s <= s0:
        return [s]
    return [s + (s0 - s) * (1 - t / (stages - 1)) ** 3 for t in range(stages)]
