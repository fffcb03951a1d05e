import pytest
import torch

from hf_svdq.algorithms.groupquant import CLIP_GRID, pack_codes, quantize_gptq, quantize_rtn, unpack_codes
from hf_svdq.algorithms.whitening import output_error


def _weights(m=32, n=128, seed=0):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip_and_shape(bits):
    q = quantize_rtn(_weights(), bits, 64)
    packed = pack_codes(q.codes, bits, 64)
    assert packed.shape == (32, 2, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits), q.codes)


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_error_is_half_a_step_inside_the_range(bits):
    w = _weights()
    q = quantize_rtn(w, bits, 32)
    assert int(q.codes.max()) <= 2**bits - 1
    step = q.scale.float().repeat_interleave(32, dim=1)
    error = (q.dequantize() - w).abs()
    # the integer zero point shifts the grid by up to half a step, so only the extremes may be off by a step
    assert torch.all(error <= step * (1 + 1e-4))
    assert (error > step / 2 + 1e-6).float().mean() < 0.02


def test_clip_search_never_increases_error():
    w = _weights() * torch.where(torch.rand(32, 128) < 0.02, 20.0, 1.0)  # a few outliers
    plain = (quantize_rtn(w, 4, 64).dequantize() - w).pow(2).sum()
    searched = (quantize_rtn(w, 4, 64, clips=CLIP_GRID).dequantize() - w).pow(2).sum()
    assert searched <= plain


def test_gptq_beats_rtn_on_correlated_inputs():
    w = _weights()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 128, generator=g) @ torch.randn(128, 128, generator=g)
    gram = (x.T @ x).double()
    rtn = output_error(w, quantize_rtn(w, 4, 64).dequantize(), gram)
    gptq = output_error(w, quantize_gptq(w, gram, 4, 64).dequantize(), gram)
    assert gptq < 0.7 * rtn


@pytest.mark.parametrize(("bits", "group"), [(3, 64), (4, 48)])
def test_bad_group_arguments(bits, group):
    with pytest.raises(ValueError, match="residual_bits|group_size"):
        quantize_rtn(_weights(), bits, group)


def test_inverse_hessian_factor_matches_gptq_reference_chain():
    """U with U^T U = H^-1 (upper), as GPTQ's reference computes it with cholesky_inverse."""
    from hf_svdq.algorithms.groupquant import inverse_hessian_factor

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 48, generator=g, dtype=torch.float64)
    gram = x.T @ x
    gram[5, :] = gram[:, 5] = 0.0  # a column the calibration never reached
    h = gram.clone()
    h[5, 5] = 1.0
    h += torch.eye(48, dtype=h.dtype) * 0.01 * float(h.diagonal().mean())
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    factor = inverse_hessian_factor(gram, 0.01).double()
    assert torch.allclose(factor, reference, rtol=1e-3, atol=1e-5 * float(reference.abs().max()))
    assert torch.equal(factor, factor.triu())
