import pytest
import torch

from hf_svdq.algorithms.budget import allocate_ranks, tail_loss

SPECTRA = {
    "flat": torch.ones(64),
    "steep": torch.logspace(0, -4, 64),
    "medium": torch.logspace(0, -1, 32),
}


def _cost(name, rank):
    return rank * 10


@pytest.mark.parametrize("budget", [200, 640, 1000])
def test_allocation_respects_budget_and_floor(budget):
    ranks = allocate_ranks(SPECTRA, _cost, budget, floor=4, step=4)
    assert sum(_cost(n, r) for n, r in ranks.items()) <= budget
    assert all(r >= 4 for r in ranks.values())


def test_more_budget_never_increases_loss():
    def total(ranks):
        return sum(float(tail_loss(SPECTRA[n])[r]) for n, r in ranks.items())
    losses = [total(allocate_ranks(SPECTRA, _cost, b, floor=0, step=4)) for b in (100, 300, 600, 1000)]
    assert losses == sorted(losses, reverse=True)


def test_steep_spectrum_gets_fewer_ranks_than_flat():
    ranks = allocate_ranks({"flat": SPECTRA["flat"], "steep": SPECTRA["steep"]}, _cost, 500, floor=0, step=2)
    assert ranks["steep"] < ranks["flat"]


def test_budget_below_floor_names_the_numbers():
    with pytest.raises(ValueError, match="floor of rank 8 already costs 240 > budget 100"):
        allocate_ranks(SPECTRA, _cost, 100, floor=8)


def test_tail_loss_ends_at_zero_and_starts_at_one():
    loss = tail_loss(torch.tensor([2.0, 1.0]))
    assert loss.tolist() == pytest.approx([1.0, 0.2, 0.0])
