"""Rank allocation under a global budget, from each matrix's measured truncation loss.

Pure: spectra and sizes in, ranks out. The loss of keeping rank ``r`` of a matrix is the share of
its (whitened, when calibrated) squared singular values beyond ``r``: the relative output error the
truncation causes. Ranks grow greedily, ``step`` at a time, wherever the loss falls most per byte.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping

import torch


def tail_loss(spectrum: torch.Tensor) -> torch.Tensor:
    """``loss[r]`` = share of squared singular values beyond rank ``r`` (``r = 0 .. len``)."""
    power = spectrum.detach().to(torch.float64) ** 2
    total = float(power.sum()) or 1.0
    tail = torch.flip(torch.cumsum(torch.flip(power, [0]), 0), [0]) / total
    return torch.cat([tail, torch.zeros(1, dtype=torch.float64)])


def allocate_ranks(
    spectra: Mapping[str, torch.Tensor],
    cost: Callable[[str, int], float],
    budget: float,
    floor: int = 0,
    step: int = 8,
    max_rank: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Ranks with ``sum(cost(name, rank)) <= budget`` (the floor always included), greedily
    minimizing the summed tail loss. Raises ``ValueError`` naming the numbers when even the floor
    does not fit."""
    losses = {n: tail_loss(s) for n, s in spectra.items()}
    limits = {n: min(len(s), (max_rank or {}).get(n, len(s))) for n, s in spectra.items()}
    ranks = {n: min(floor, limits[n]) for n in spectra}
    spent = sum(cost(n, r) for n, r in ranks.items())
    if spent > budget:
        raise ValueError(f"rank budget cannot be met: the floor of rank {floor} already costs {spent:.0f} > budget {budget:.0f}")

    def candidate(name: str) -> tuple[float, str, int] | None:
        r = ranks[name]
        new = min(r + step, limits[name])
        if new == r:
            return None
        gain = float(losses[name][r] - losses[name][new])
        extra = cost(name, new) - cost(name, r)
        return (-gain / max(extra, 1e-12), name, new)

    heap = [c for c in (candidate(n) for n in spectra) if c is not None]
    heapq.heapify(heap)
    while heap:
        _, name, new = heapq.heappop(heap)
        extra = cost(name, new) - cost(name, ranks[name])
        if spent + extra > budget:
            continue  # this matrix's next step does not fit; others' smaller steps still may
        spent += extra
        ranks[name] = new
        nxt = candidate(name)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return ranks
