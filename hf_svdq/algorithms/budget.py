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
    return torch.cat([tail, torch.zeros(1, dtype=torch.float64, device=tail.device)])


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


def _hull(options: list[tuple[object, float, float]]) -> list[tuple[object, float, float]]:
    """Options on the lower convex hull of (cost, loss), cheapest first, loss strictly falling."""
    ordered = sorted(options, key=lambda o: (o[1], o[2]))
    hull: list[tuple[object, float, float]] = []
    for option in ordered:
        if hull and option[2] >= hull[-1][2]:
            continue  # costs at least as much and loses no less
        while len(hull) >= 2:
            (_, c1, l1), (_, c2, l2) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the segment from hull[-2] to option
            if (l1 - l2) * (option[1] - c2) <= (l2 - option[2]) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append(option)
    return hull


def choose_options(
    options: Mapping[str, list[tuple[object, float, float]]],
    budget: float | None = None,
    max_loss: float | None = None,
) -> dict[str, tuple[object, float, float]]:
    """One ``(key, cost, loss)`` option per item: the cheapest first, then upgrades in order of loss
    saved per unit of cost, while the total cost stays within ``budget`` or until the summed loss is
    at most ``max_loss`` (give exactly one). Raises ``ValueError`` naming the numbers when the
    cheapest choice already exceeds the budget or the best one cannot reach ``max_loss``."""
    if (budget is None) == (max_loss is None):
        raise ValueError("choose_options: give exactly one of budget and max_loss")
    for name, opts in options.items():
        if not opts:
            raise ValueError(f"choose_options: {name!r} has no option")
    hulls = {n: _hull(list(o)) for n, o in options.items()}
    level = dict.fromkeys(hulls, 0)
    spent = sum(h[0][1] for h in hulls.values())
    loss = sum(h[0][2] for h in hulls.values())
    if budget is not None and spent > budget:
        raise ValueError(f"budget cannot be met: the cheapest choice already costs {spent:.0f} > budget {budget:.0f}")
    if max_loss is not None:
        best = sum(min(o[2] for o in opts) for opts in options.values())
        if best > max_loss:
            raise ValueError(f"quality floor cannot be met: the best choice predicts loss {best:.4g} > {max_loss:.4g}")

    def step(name: str) -> tuple[float, str] | None:
        hull, i = hulls[name], level[name]
        if i + 1 >= len(hull):
            return None
        saved = hull[i][2] - hull[i + 1][2]
        extra = hull[i + 1][1] - hull[i][1]
        return (-saved / max(extra, 1e-12), name)

    heap = [s for s in (step(n) for n in hulls) if s is not None]
    heapq.heapify(heap)
    while heap and (max_loss is None or loss > max_loss):
        _, name = heapq.heappop(heap)
        hull, i = hulls[name], level[name]
        extra = hull[i + 1][1] - hull[i][1]
        if budget is not None and spent + extra > budget:
            continue  # this item's next upgrade does not fit; cheaper upgrades of others still may
        spent += extra
        loss -= hull[i][2] - hull[i + 1][2]
        level[name] = i + 1
        nxt = step(name)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return {n: hulls[n][level[n]] for n in hulls}
