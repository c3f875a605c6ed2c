"""Carry-over-balanced order of interleaved benchmark variants.

A variant's step time depends a little on the step run just before it (caches, allocator, clocks), so
the rounds (each variant once) are chained so that, over a cycle of k - 1 rounds for k variants, every
variant is preceded by every other exactly once, round boundaries included, and never by itself.
"""

from __future__ import annotations

import itertools
from functools import cache


@cache
def balanced_cycle(k: int) -> tuple[tuple[int, ...], ...]:
    """k - 1 permutations of range(k) whose concatenation, read cyclically, holds each ordered pair of
    distinct variants exactly once as neighbours (k <= 6: a small search; beyond that a rotation)."""
    if k <= 2:
        return (tuple(range(k)),)
    if k > 6:
        return tuple(tuple((i + r) % k for i in range(k)) for r in range(k))
    perms = [p for p in itertools.permutations(range(k)) if p[0] == 0] + \
        [p for p in itertools.permutations(range(k)) if p[0] != 0]
    rounds = k - 1

    def pairs(p):
        return {(a, b) for a, b in itertools.pairwise(p)}

    def search(chosen, used):
        if len(chosen) == rounds:
            closing = (chosen[-1][-1], chosen[0][0])
            return chosen if closing[0] != closing[1] and closing not in used else None
        for p in perms if chosen else perms[:1]:
            inner = pairs(p)
            link = {(chosen[-1][-1], p[0])} if chosen else set()
            if len(inner | link) < len(inner) + len(link) or (inner | link) & used:
                continue
            if link and next(iter(link))[0] == p[0]:
                continue
            found = search(chosen + [p], used | inner | link)
            if found:
                return found
        return None

    found = search([], set())
    assert found is not None, k
    return tuple(found)


def round_order(k: int, rnd: int) -> tuple[int, ...]:
    """The variant indices of round `rnd` (0-based), cycling through balanced_cycle(k)."""
    cycle = balanced_cycle(k)
    return cycle[rnd % len(cycle)]


def cycle_rounds(k: int) -> int:
    """Rounds in one balanced cycle: timed rounds should be a multiple of it."""
    return len(balanced_cycle(k))
