import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_svdq.algorithms.linalg import low_rank_int8
from hf_svdq.kernels.reference import low_rank_linear, low_rank_linear_reference
from hf_svdq.nn.low_rank import SVDQLinear


def _linear(bias=True):
    torch.manual_seed(0)
    return nn.Linear(40, 24, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dequantized_dense(bias):
    dense = _linear(bias)
    layer = SVDQLinear.from_dense(dense, rank=10)
    x = torch.randn(3, 5, 40)
    expected = nn.functional.linear(x, layer.dequantize(), layer.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert layer(x).shape == (3, 5, 24)


def test_factors_match_torch_svd_within_int8_error():
    dense = _linear()
    layer = SVDQLinear.from_dense(dense, rank=10)
    u, s, vh = torch.linalg.svd(dense.weight.detach())
    best = (u[:, :10] * s[:10]) @ vh[:10]
    rel = (layer.dequantize() - best).norm() / best.norm()
    assert rel < 0.02
    assert layer.weight.dtype == torch.int8 and layer.weight_vh.dtype == torch.int8
    assert layer.weight.shape == (24, 10) and layer.weight_vh.shape == (10, 40)
    assert not any(p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_in_each_compute_dtype(dtype):
    layer = SVDQLinear.from_dense(_linear(), rank=10, dtype=dtype)
    x = torch.randn(2, 40)
    reference = SVDQLinear.from_dense(_linear(), rank=10)(x)
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    assert torch.allclose(out.float(), reference, atol=0.05, rtol=0.05)


def test_fp16_large_activations_do_not_overflow():
    layer = SVDQLinear.from_dense(_linear(), rank=10, dtype=torch.float16)
    x = torch.full((1, 40), 300.0, dtype=torch.float16)
    assert torch.isfinite(layer(x)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_kernel_matches_reference_kernel(dtype):
    layer = SVDQLinear.from_dense(_linear(), rank=6, dtype=dtype)
    x = torch.randn(4, 7, 40).to(dtype)
    args = (layer.weight, layer.weight_scale, layer.weight_vh, layer.weight_vh_scale, layer.bias)
    expected = low_rank_linear_reference(x, *args)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(low_rank_linear(x, *args).float(), expected.float(), atol=tolerance, rtol=tolerance)
    assert torch.equal(layer(x), low_rank_linear(x, *args))


def test_conv1d_source_is_transposed_and_restored():
    torch.manual_seed(0)
    conv = Conv1D(24, 40)  # nf=24 outputs, nx=40 inputs; weight stored [40, 24]
    layer = SVDQLinear.from_dense(conv, rank=24)  # full rank: only INT8 error
    assert layer.transposed and (layer.out_features, layer.in_features) == (24, 40)
    x = torch.randn(2, 40)
    assert torch.allclose(layer(x), conv(x), atol=0.01)
    back = layer.to_dense_module()
    assert isinstance(back, Conv1D) and back.weight.shape == (40, 24)
    assert torch.allclose(back(x), layer(x), atol=1e-5)


def test_to_dense_module_gives_linear():
    layer = SVDQLinear.from_dense(_linear(), rank=8)
    back = layer.to_dense_module()
    assert type(back) is nn.Linear and back.weight.shape == (24, 40)
    x = torch.randn(2, 40)
    assert torch.allclose(back(x), layer(x), atol=1e-5)


def test_extra_repr_shows_shape_rank_bytes():
    text = repr(SVDQLinear.from_dense(_linear(), rank=8))
    for part in ("in_features=40", "out_features=24", "rank=8", "bytes=", "dense 3840"):
        assert part in text


def test_load_factors_rejects_wrong_shapes():
    layer = SVDQLinear(40, 24, 8, device="meta")
    with pytest.raises(ValueError, match="shapes"):
        layer.load_factors(low_rank_int8(torch.randn(24, 40), 4))


@pytest.mark.parametrize("rank", [0, 25])
def test_module_rejects_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        SVDQLinear(40, 24, rank)


def test_compiles_fullgraph():
    layer = SVDQLinear.from_dense(_linear(), rank=8)
    x = torch.randn(2, 40)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(x), layer(x))
