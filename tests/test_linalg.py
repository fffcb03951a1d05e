import math

import pytest
import torch

from hf_svdq.algorithms.linalg import (
    break_even_rank,
    energy_rank,
    factor_bytes,
    low_rank_int8,
    quantize_int8_rows,
    sqnr_db,
    truncated_svd,
)


def _matrix(m=48, n=32, seed=0):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rank", [1, 5, 32])
def test_truncated_svd_is_eckart_young_optimal(rank):
    w = _matrix()
    left, right = truncated_svd(w, rank)
    assert left.shape == (48, rank) and right.shape == (rank, 32)
    s = torch.linalg.svdvals(w)
    error = torch.linalg.matrix_norm(w - left @ right) ** 2
    assert torch.allclose(error, (s[rank:] ** 2).sum(), rtol=1e-4, atol=1e-4)


def test_truncated_svd_splits_singular_values_evenly():
    w = _matrix()
    left, right = truncated_svd(w, 6)
    # U sqrt(S) and sqrt(S) Vh: column norms of left equal row norms of right (= sqrt(s_i))
    assert torch.allclose(left.norm(dim=0), right.norm(dim=1), rtol=1e-4)
    assert torch.allclose(left.norm(dim=0) ** 2, torch.linalg.svdvals(w)[:6], rtol=1e-4)


def test_truncated_svd_upcasts_low_precision():
    w = _matrix().to(torch.bfloat16)
    left, right = truncated_svd(w, 4)
    assert left.dtype == torch.float32 and right.dtype == torch.float32


@pytest.mark.parametrize("rank", [0, 33])
def test_truncated_svd_rejects_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        truncated_svd(_matrix(), rank)


def test_int8_rows_error_is_at_most_half_a_step():
    w = _matrix() * torch.logspace(-3, 2, 48)[:, None]  # rows of very different magnitude
    q = quantize_int8_rows(w)
    assert q.codes.dtype == torch.int8 and q.codes.abs().max() <= 127
    assert q.codes.is_contiguous()
    error = (w - q.dequantize()).abs()
    assert torch.all(error <= q.scale[:, None] / 2 * (1 + 1e-5) + 1e-12)
    assert sqnr_db(w, q.dequantize()) > 38  # ~6 dB per bit, minus the crest factor


def test_int8_rows_zero_row_and_scale_dtype():
    w = _matrix(4, 8)
    w[2] = 0
    q = quantize_int8_rows(w, scale_dtype=torch.bfloat16)
    assert q.scale.dtype == torch.bfloat16
    assert q.scale[2] == 0 and torch.all(q.codes[2] == 0)
    assert torch.isfinite(q.dequantize()).all()


def test_low_rank_int8_close_to_float_factors():
    w = _matrix()
    exact_left, exact_right = truncated_svd(w, 8)
    approx = low_rank_int8(w, 8).dequantize()
    assert sqnr_db(exact_left @ exact_right, approx) > 35


def test_byte_accounting():
    assert break_even_rank(576, 576) == 288
    assert factor_bytes(10, 20, 3, 2) == 3 * 30 + (10 + 3) * 2


def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 1.0) == 3
    with pytest.raises(ValueError, match="energy"):
        energy_rank(s, 1.5)


def test_sqnr_identity_is_infinite():
    w = _matrix()
    assert math.isinf(sqnr_db(w, w))
