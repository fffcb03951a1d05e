"""Fused CPU kernels (numba; the compiled ones: ``test_cpp_kernels.py``) against the pure-PyTorch reference, backend selection, and the op contract.

Error bounds, stated: float32 activations agree with the float32 reference within 2e-6 of the
output's largest magnitude (only the summation order differs). bf16/fp16 activations are computed in
float32 by the kernels and rounded once at the end, so they are compared with the float32 reference on
the same (rounded) input within one output rounding step (2^-8 of the largest magnitude for bf16).
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from hf_svdq.algorithms.groupquant import quantize_rtn
from hf_svdq.algorithms.linalg import low_rank_int8
from hf_svdq.kernels import backend, ops
from hf_svdq.kernels.reference import low_rank_linear, low_rank_linear_reference, residual_linear_reference
from hf_svdq.nn.low_rank import SVDQLinear
from hf_svdq.nn.residual import SVDQResidualLinear

pytest.importorskip("numba")


@pytest.fixture
def kernels(monkeypatch):
    """Force the numba backend (whatever the CPU) with a large fused-row threshold."""
    monkeypatch.setenv(backend.BACKEND_ENV, "numba")
    monkeypatch.setenv(backend.ROWS_ENV, "16")
    backend.reset()
    yield backend.active()
    backend.reset()


def residual_layer(out_f, in_f, bits, group, rank, bias, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=generator)
    base = quantize_rtn(weight, bits, group)
    correction = low_rank_int8(weight - base.dequantize(), rank, torch.float32) if rank else None
    layer = SVDQResidualLinear(in_f, out_f, rank, bits, group, bias, device="meta")
    layer.load(base, correction, torch.randn(out_f, generator=generator) if bias else None)
    return layer


def reference_args(layer):
    correction = (layer.weight_u, layer.weight_u_scale, layer.weight_vh, layer.weight_vh_scale) if layer.rank else (None,) * 4
    return (layer.weight, layer.weight_scale, layer.weight_zero, layer.bits, *correction, layer.bias)


def assert_close_to_float32_reference(got, x, reference):
    """``got`` (any dtype) against ``reference(x.float())`` within the bound stated in the module docstring."""
    expected = reference(x.float())
    scale = expected.abs().max().item()
    bound = 2e-6 if got.dtype == torch.float32 else (2**-8 if got.dtype == torch.bfloat16 else 2**-11)
    error = (got.float() - expected).abs().max().item()
    assert error <= bound * scale + 1e-6, f"max abs error {error:.3g} > {bound:.3g} x {scale:.3g}"


SHAPES = [  # (out, in, group): odd sizes, a group of one byte, and a SmolLM2-sized MLP layer
    (37, 96, 32),
    (13, 24, 8),
    (5, 128, 128),
    (1536, 576, 64),
]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("out_f", "in_f", "group"), SHAPES)
@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_residual_kernel_matches_reference(kernels, bits, out_f, in_f, group, rank, bias):
    layer = residual_layer(out_f, in_f, bits, group, rank, bias)
    args = reference_args(layer)
    for shape in [(1, 1, in_f), (3, 1, in_f), (8, 1, in_f), (2, 5, in_f), (1, 40, in_f)]:  # 40 rows: GEMM path
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape).to(dtype)
            with torch.no_grad():
                got = layer(x)
            assert got.shape == (*shape[:-1], out_f) and got.dtype == dtype
            if dtype != torch.float32 and shape[0] * shape[1] > kernels.max_rows:
                assert torch.equal(got, residual_linear_reference(x, *args))  # large bf16 inputs: the reference
            else:
                assert_close_to_float32_reference(got, x, lambda xf: residual_linear_reference(xf, *args))


def test_residual_kernel_in_float16(kernels):
    layer = residual_layer(37, 96, 4, 32, 3, True)
    x = torch.randn(2, 96).half()
    with torch.no_grad():
        got = layer(x)
    assert got.dtype == torch.float16
    assert_close_to_float32_reference(got, x, lambda xf: residual_linear_reference(xf, *reference_args(layer)))


@pytest.mark.parametrize(("out_f", "in_f", "rank"), [(24, 40, 6), (7, 33, 5), (1536, 576, 128)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_rank_kernel_matches_reference(kernels, out_f, in_f, rank, bias, dtype):
    torch.manual_seed(0)
    layer = SVDQLinear.from_dense(torch.nn.Linear(in_f, out_f, bias=bias), rank=rank)
    args = (layer.weight, layer.weight_scale, layer.weight_vh, layer.weight_vh_scale, layer.bias)
    for shape in [(1, 1, in_f), (1, in_f), (4, 3, in_f)]:
        x = torch.randn(shape).to(dtype)
        with torch.no_grad():
            got = layer(x)
        assert got.shape == (*shape[:-1], out_f)
        if dtype != torch.float32 and x.numel() // in_f > backend.LOW_RANK_FUSED_ROWS:
            assert torch.equal(got, low_rank_linear(x, *args))  # several rows: PyTorch's thin GEMMs
        else:
            assert_close_to_float32_reference(got, x, lambda xf: low_rank_linear_reference(xf, *args))


def test_fused_path_really_runs_and_reference_env_turns_it_off(monkeypatch):
    layer = residual_layer(37, 96, 4, 32, 3, True)
    x = torch.randn(1, 96)
    calls = []
    monkeypatch.setattr(ops, "_fused_residual", lambda *a: calls.append(1) or residual_linear_reference(*a[1:]))
    for choice, expected_calls in (("numba", 1), ("reference", 1)):
        monkeypatch.setenv(backend.BACKEND_ENV, choice)
        backend.reset()
        with torch.no_grad():
            layer(x)
        assert len(calls) == expected_calls
    backend.reset()


def test_auto_falls_back_to_the_reference_without_avx2(monkeypatch, caplog):
    monkeypatch.setenv(backend.BACKEND_ENV, "auto")
    monkeypatch.setattr(backend, "_cpu_has_avx2_fma", lambda: False)
    monkeypatch.setattr(backend.cpp, "isa", lambda module: 0)  # the compiled kernels' scalar path only
    backend.reset()
    with caplog.at_level(logging.INFO, logger="hf_svdq"):
        chosen = backend.active()
    assert chosen.module is None and "AVX2" in chosen.reason
    assert any("hf_svdq kernels: pure-PyTorch reference" in r.getMessage() for r in caplog.records)
    layer = residual_layer(37, 96, 4, 32, 3, True)
    x = torch.randn(1, 96)
    with torch.no_grad():
        assert torch.equal(layer(x), residual_linear_reference(x, *reference_args(layer)))
    backend.reset()


def test_one_log_line_names_the_active_backend(monkeypatch, caplog):
    monkeypatch.setenv(backend.BACKEND_ENV, "numba")
    backend.reset()
    with caplog.at_level(logging.INFO, logger="hf_svdq"):
        backend.active()
        backend.active()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hf_svdq kernels")]
    assert len(lines) == 1 and "numba" in lines[0] and backend.BACKEND_ENV in lines[0]
    backend.reset()


@pytest.mark.parametrize(("name", "value"), [(backend.BACKEND_ENV, "cuda"), (backend.ROWS_ENV, "-1"), (backend.ROWS_ENV, "x")])
def test_bad_environment_values_are_clear_errors(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    backend.reset()
    with pytest.raises(ValueError, match=name):
        backend.active()
    backend.reset()


def test_ops_have_fake_implementations_for_meta_tracing():
    layer = residual_layer(37, 96, 4, 32, 3, True)
    meta = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in reference_args(layer)]
    out = torch.ops.hf_svdq.residual_linear(torch.empty(2, 5, 96, device="meta"), *meta)
    assert out.shape == (2, 5, 37) and out.device.type == "meta"
    lr = SVDQLinear.from_dense(torch.nn.Linear(40, 24), rank=6)
    args = [t.to("meta") for t in (lr.weight, lr.weight_scale, lr.weight_vh, lr.weight_vh_scale, lr.bias)]
    assert torch.ops.hf_svdq.low_rank_linear(torch.empty(3, 40, device="meta"), *args).shape == (3, 24)


def test_compiles_fullgraph_through_the_op(kernels):
    layer = residual_layer(37, 96, 4, 32, 3, True)
    x = torch.randn(1, 96)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x), layer(x), atol=1e-5)


def test_gradients_flow_through_the_reference(kernels):
    layer = residual_layer(37, 96, 4, 32, 3, True)
    x = torch.randn(1, 96, requires_grad=True)
    layer(x).sum().backward()
    expected = layer.dequantize().sum(0)
    assert torch.allclose(x.grad[0], expected, atol=1e-4)


def test_no_float_copy_of_the_weights_is_kept(kernels):
    layer = residual_layer(1536, 576, 4, 64, 8, True)
    before = sum(p.numel() * p.element_size() for p in layer.parameters())
    with torch.no_grad():
        layer(torch.randn(1, 576))
    cached = ops._VIEWS[id(layer.weight)][1]
    import numpy as np

    owned = sum(a.nbytes for a, p in zip(cached, reference_args(layer)[:3] + reference_args(layer)[4:])
                if not (isinstance(p, torch.Tensor) and np.shares_memory(a, p.numpy())))
    assert owned <= (1536 + 8 + 1536) * 4  # float32 copies of row scales and bias only
    assert owned < before / 100


def test_views_are_not_carried_by_copies_or_pickles(kernels):
    import copy
    import io

    layer = residual_layer(37, 96, 4, 32, 3, True)
    with torch.no_grad():
        layer(torch.randn(1, 96))
    assert id(layer.weight) in ops._VIEWS and not layer.weight.__dict__
    clone = copy.deepcopy(layer)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    assert id(clone.weight) not in ops._VIEWS
    assert buffer.tell() < 2 * sum(p.numel() * p.element_size() for p in layer.parameters()) + 20000


def test_views_are_dropped_with_the_layer(kernels):
    import gc

    layer = residual_layer(37, 96, 4, 32, 3, True)
    with torch.no_grad():
        layer(torch.randn(1, 96))
    key = id(layer.weight)
    assert key in ops._VIEWS
    del layer
    gc.collect()
    assert key not in ops._VIEWS


def test_cached_views_follow_in_place_updates(kernels):
    layer = residual_layer(37, 96, 4, 32, 3, True)
    other = residual_layer(37, 96, 4, 32, 3, True, seed=1)
    x = torch.randn(1, 96)
    with torch.no_grad():
        layer(x)
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.allclose(layer(x), other(x), atol=1e-5)


def test_parallel_kernels_match_and_two_threads_agree(monkeypatch, kernels):
    monkeypatch.setattr(backend, "PARALLEL_MIN_WEIGHTS", 0)
    layer = residual_layer(301, 128, 4, 32, 5, True)
    lr = SVDQLinear.from_dense(torch.nn.Linear(128, 301), rank=9)
    x = torch.randn(1, 128)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            expected = layer(x), lr(x)
            results: list = []

            def work():
                results.append([(layer(x), lr(x)) for _ in range(50)])

            workers = [threading.Thread(target=work) for _ in range(2)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
    finally:
        torch.set_num_threads(threads)
    assert_close_to_float32_reference(expected[0], x, lambda xf: residual_linear_reference(xf, *reference_args(layer)))
    for run in results:
        for got_res, got_lr in run:
            assert torch.equal(got_res, expected[0]) and torch.equal(got_lr, expected[1])


def test_two_threads_generating_at_once_give_the_tokens_of_one(kernels, tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    from hf_svdq import SVDQuantConfig

    model = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint("llama"), quantization_config=SVDQuantConfig(rank=4, residual_bits=4, group_size=16)
    )
    prompts = [torch.tensor([[1, 5, 9, 2]]), torch.tensor([[7, 3, 3, 8, 1]])]
    with torch.no_grad():
        alone = [model.generate(p, max_new_tokens=12, do_sample=False) for p in prompts]
        together: dict[int, torch.Tensor] = {}

        def run(i: int) -> None:
            for _ in range(3):
                together[i] = model.generate(prompts[i], max_new_tokens=12, do_sample=False)

        workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert all(torch.equal(together[i], alone[i]) for i in range(2))


def test_int8_head_decodes_from_int8_and_stores_nothing_new(kernels, tiny_checkpoint, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from hf_svdq import SVDQuantConfig
    from hf_svdq.nn.head import SVDQInt8Head

    config = SVDQuantConfig(rank=4, residual_bits=4, group_size=16, int8_head=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=config)
    head = model.lm_head
    assert isinstance(head, SVDQInt8Head) and head.weight is model.model.embed_tokens.weight
    hidden = torch.randn(1, 1, 64)
    with torch.no_grad():
        exact = torch.nn.functional.linear(hidden, head.weight)
        decoded = head(hidden)
        assert not torch.equal(decoded, exact)  # the INT8 copy really is used for one row
        assert (decoded - exact).abs().max() <= 0.01 * exact.abs().max()
        large = torch.randn(1, 40, 64)
        assert torch.equal(head(large), torch.nn.functional.linear(large, head.weight))  # prefill: the float head
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("lm_head")]  # noqa: SIM118 (safe_open is no dict)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(again.lm_head, SVDQInt8Head) and again.config.quantization_config.int8_head is True
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(again.generate(ids, max_new_tokens=6, do_sample=False), model.generate(ids, max_new_tokens=6, do_sample=False))
    again.dequantize()
    assert type(again.lm_head) is torch.nn.Linear


def test_int8_head_must_be_a_bool():
    from hf_svdq import SVDQuantConfig

    with pytest.raises(ValueError, match="int8_head"):
        SVDQuantConfig(rank=4, int8_head="yes")


@pytest.mark.parametrize("user_value", [None, "123"])
def test_first_parallel_launch_gives_numba_a_spin_count_and_restores_the_environment(monkeypatch, user_value):
    import os

    monkeypatch.setattr(backend, "_parallel_is_thread_safe", None)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    if user_value is None:
        monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    else:
        monkeypatch.setenv("GOMP_SPINCOUNT", user_value)
    seen = []
    assert backend.run_parallel(lambda a: seen.append(os.environ.get("GOMP_SPINCOUNT")) or a, 7) == 7
    assert seen == [user_value or backend.SPIN_COUNT]
    assert os.environ.get("GOMP_SPINCOUNT") == user_value
