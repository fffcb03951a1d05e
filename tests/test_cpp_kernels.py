"""Compiled integer kernels (``hf_svdq/kernels/csrc``) against an exact emulation and the reference.

Numerics, stated: the kernels quantize each input row to int8 per block of 32 (scale ``max|x| / 127``), as
ggml does, and compute the layer on those rounded activations ``x'`` exactly (the zero points meet the
group sums of ``x'``, as ggml's Q8_1 block sums): against :func:`emulate` (the float64 reference on ``x'``)
they agree within 2e-6 of the output's largest magnitude (float32 summation order). Against the reference
on ``x`` the difference is the activation rounding only: at most ``sum_k |W_k| |x_k - x'_k|`` per output
(``W`` the dequantized weight); the tests check that bound.

Every instruction-set variant this CPU runs is tested (``HF_SVDQ_ISA``). Where the kernels cannot be built
the tests skip, unless ``HF_SVDQ_REQUIRE_COMPILED=1`` (CI sets it), which turns a failed build into a failure.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from hf_svdq.algorithms.groupquant import unpack_codes
from hf_svdq.kernels import backend, cpp
from hf_svdq.kernels.reference import low_rank_linear_reference, residual_linear_reference

from .test_kernels import reference_args, residual_layer


def _module():
    module, why = cpp.load()
    if module is None:
        if os.environ.get("HF_SVDQ_REQUIRE_COMPILED") == "1":
            pytest.fail(f"HF_SVDQ_REQUIRE_COMPILED=1 and {why}")
        pytest.skip(why)
    return module


def _isas() -> list[str]:
    module, _ = cpp.load()
    names = [name for name, number in cpp.ISAS.items() if module is None or module.supports(number)]
    return names or ["scalar"]


@pytest.fixture(params=_isas())
def compiled(request, monkeypatch):
    """The compiled backend at one instruction set, fused for up to 16 rows."""
    _module()
    monkeypatch.setenv(backend.BACKEND_ENV, "cpp")
    monkeypatch.setenv(cpp.ISA_ENV, request.param)
    monkeypatch.setenv(backend.ROWS_ENV, "16")
    backend.reset()
    chosen = backend.active()
    assert chosen.compiled is not None and cpp.isa_name(chosen.isa) == request.param
    yield chosen
    backend.reset()


def rounded(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32 ``[rows, in]``) as the kernels see it: int8 per block of 32 times the block scale."""
    blocks = x.reshape(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inverse) * scale).reshape(x.shape)


def emulate(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernels compute, in float64: the layer on the rounded activations, and ``|W|``."""
    xr = rounded(x).double()
    groups = layer.weight.shape[1]
    codes = unpack_codes(layer.weight, layer.bits).double()
    group = codes.shape[1] // groups
    expanded = layer.weight_scale.double().repeat_interleave(group, 1)
    weight = (codes - layer.weight_zero.double().repeat_interleave(group, 1)) * expanded
    magnitude = weight.abs()
    if layer.rank:
        u = layer.weight_u.double() * layer.weight_u_scale.double()[:, None]
        vh = layer.weight_vh.double() * layer.weight_vh_scale.double()[:, None]
        weight = weight + u @ vh
        magnitude = magnitude + u.abs() @ vh.abs()
    y = xr @ weight.T
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y, magnitude


def check(got: torch.Tensor, x: torch.Tensor, emulated: torch.Tensor, magnitude: torch.Tensor, reference: torch.Tensor) -> None:
    scale = emulated.abs().max().item()
    error = (got.double() - emulated).abs().max().item()
    assert error <= 2e-6 * scale + 1e-6, f"against the emulation: {error:.3g} (scale {scale:.3g})"
    bound = (x.double() - rounded(x).double()).abs() @ magnitude.T
    excess = (got.double() - reference.double()).abs() - bound - 2e-6 * scale - 1e-6
    assert excess.max().item() <= 0, f"beyond the activation-rounding bound by {excess.max().item():.3g}"


SHAPES = [(37, 96, 32), (5, 128, 128), (1536, 576, 64), (64, 2048, 64)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("out_f", "in_f", "group"), SHAPES)
@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("rows", [1, 3])
def test_residual_kernel_matches_its_emulation_and_the_reference_within_the_bound(compiled, bits, out_f, in_f, group, rank, rows):
    layer = residual_layer(out_f, in_f, bits, group, rank, bias=True)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = layer(x)
    emulated, magnitude = emulate(layer, x)
    check(got, x, emulated, magnitude, residual_linear_reference(x, *reference_args(layer)))


def test_input_rows_of_zeros_and_huge_values(compiled):
    layer = residual_layer(64, 128, 4, 64, 3, bias=False)
    x = torch.zeros(2, 128)
    x[1, :32] = 1e4  # one block saturating, the rest zero
    with torch.no_grad():
        got = layer(x)
    emulated, magnitude = emulate(layer, x)
    check(got, x, emulated, magnitude, residual_linear_reference(x, *reference_args(layer)))
    assert torch.equal(got[0], torch.zeros(64))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_the_largest_codes_and_activations_do_not_saturate(compiled, bits, group):
    """Every code at its maximum against activations at +-127: the AVX2 INT4 kernels add two ``maddubs`` pair sums in
    int16 before widening (at most 4 x 15 x 127 = 7620) and INT8 meets ``codes - 128``; all must stay exact."""
    from hf_svdq.nn.residual import SVDQResidualLinear

    out_f, in_f = 8, 256
    layer = SVDQResidualLinear(in_f, out_f, 0, bits, group, bias=False)
    layer.weight.data.fill_(255)  # INT4: both nibbles 15; INT8: 255
    layer.weight_scale.data.fill_(1.0)
    layer.weight_zero.data.zero_()
    x = torch.stack([torch.ones(in_f), -torch.ones(in_f), torch.where(torch.arange(in_f) % 3 == 0, 1.0, -1.0)])
    with torch.no_grad():
        got = layer(x)
    top = 15.0 if bits == 4 else 255.0
    assert torch.equal(got, (x.sum(1, keepdim=True) * top).expand(3, out_f)), got[:, 0]


@pytest.mark.parametrize(("out_f", "in_f", "rank"), [(48, 96, 8), (1536, 576, 40)])
def test_low_rank_kernel_matches_its_emulation(compiled, out_f, in_f, rank):
    from hf_svdq.algorithms.linalg import low_rank_int8
    from hf_svdq.nn.low_rank import SVDQLinear

    generator = torch.Generator().manual_seed(2)
    factors = low_rank_int8(torch.randn(out_f, in_f, generator=generator), rank)
    layer = SVDQLinear(in_f, out_f, rank, True, device="meta")
    layer.load_factors(factors)
    layer.bias = torch.nn.Parameter(torch.randn(out_f, generator=generator), requires_grad=False)
    x = torch.randn(1, in_f, generator=generator)
    with torch.no_grad():
        got = layer(x)
    u = layer.weight.double() * layer.weight_scale.double()[:, None]
    vh = layer.weight_vh.double() * layer.weight_vh_scale.double()[:, None]
    emulated = rounded(x).double() @ (u @ vh).T + layer.bias.double()
    reference = low_rank_linear_reference(x, layer.weight, layer.weight_scale, layer.weight_vh, layer.weight_vh_scale, layer.bias)
    check(got, x, emulated, u.abs() @ vh.abs(), reference)


def test_bfloat16_activations_round_once_at_the_end(compiled):
    layer = residual_layer(1536, 576, 4, 64, 3, bias=True)
    x = torch.randn(1, 576).to(torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
        exact = layer(x.float())
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, exact.to(torch.bfloat16))


def test_one_and_two_threads_give_the_same_bits(compiled):
    layer = residual_layer(1536, 576, 4, 64, 24, bias=True)
    x = torch.randn(2, 576)
    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = layer(x)
            torch.set_num_threads(2)
            two = layer(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_widths_the_kernels_cannot_take_go_to_numba(compiled, monkeypatch):
    from hf_svdq.kernels import ops

    layer = residual_layer(13, 24, 4, 8, 3, bias=True)  # width 24, group 8: not multiples of 32
    calls = []
    real = ops._fused_residual
    monkeypatch.setattr(ops, "_fused_residual", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        layer(torch.randn(1, 24))
    assert calls == [1]


def test_the_log_line_names_the_compiled_kernels_and_the_instruction_set(monkeypatch, caplog):
    _module()
    monkeypatch.setattr(backend, "AUTO_COMPILED", True)
    monkeypatch.setenv(backend.BACKEND_ENV, "auto")
    monkeypatch.setenv(cpp.ISA_ENV, "avx2")
    backend.reset()
    with caplog.at_level(logging.INFO, logger="hf_svdq"):
        chosen = backend.active()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hf_svdq kernels")]
    assert chosen.compiled is not None and len(lines) == 1 and "compiled integer kernels (avx2)" in lines[0]
    backend.reset()


def test_a_failed_build_falls_back_to_numba_with_the_reason(monkeypatch, caplog):
    monkeypatch.setattr(backend, "AUTO_COMPILED", True)
    monkeypatch.setenv(backend.BACKEND_ENV, "auto")
    monkeypatch.setattr(backend.cpp, "load", lambda: (None, "the compiled kernels could not be built in X (no compiler)"))
    backend.reset()
    with caplog.at_level(logging.INFO, logger="hf_svdq"):
        chosen = backend.active()
    assert chosen.compiled is None and chosen.name == "numba" and "no compiler" in chosen.reason
    assert any("numba" in r.getMessage() and "no compiler" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv(backend.BACKEND_ENV, "cpp")
    backend.reset()
    with pytest.raises(ImportError, match="no compiler"):
        backend.active()
    backend.reset()


def test_auto_uses_the_compiled_kernels_where_they_build(monkeypatch):
    module = _module()
    monkeypatch.setenv(backend.BACKEND_ENV, "auto")
    monkeypatch.delenv(cpp.ISA_ENV, raising=False)
    backend.reset()
    chosen = backend.active()
    assert backend.AUTO_COMPILED and chosen.name == "cpp" and chosen.compiled is module
    backend.reset()


def test_the_compiled_path_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(cpp.DISABLE_ENV, "0")
    cpp.load.cache_clear()
    try:
        module, why = cpp.load()
        assert module is None and f"{cpp.DISABLE_ENV}=0" in why
        monkeypatch.setenv(backend.BACKEND_ENV, "auto")
        backend.reset()
        assert backend.active().compiled is None
    finally:
        monkeypatch.delenv(cpp.DISABLE_ENV)
        cpp.load.cache_clear()
        backend.reset()


def test_bad_isa_value_is_a_clear_error(monkeypatch):
    module = _module()
    monkeypatch.setenv(cpp.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match=cpp.ISA_ENV):
        cpp.isa(module)


def test_no_float_weight_is_kept(compiled):
    """The compiled path reads the layer's codes in place and keeps nothing per layer (no float copies)."""
    from hf_svdq.kernels import ops

    layer = residual_layer(1536, 576, 4, 64, 3, bias=True)
    before = len(ops._VIEWS)
    with torch.no_grad():
        layer(torch.randn(1, 576))
    assert len(ops._VIEWS) == before
