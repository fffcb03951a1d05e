"""Mixture-of-experts models: fused expert stacks compressed, reloaded, generated with, reported."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_svdq import SVDQuantConfig
from hf_svdq.nn.experts import SVDQExperts, dense_projection, find_expert_stacks, routed_forward

from .moe_models import MOE_ARCHITECTURES, tiny_moe

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cache: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in cache:
            folder = tmp_path_factory.mktemp(f"{arch}-dense")
            tiny_moe(arch).save_pretrained(folder)
            cache[arch] = folder
        return cache[arch]

    return make


def _load(path: Path, config: SVDQuantConfig | None = None):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    kwargs = {} if config is None else {"quantization_config": config}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def _logits(model) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(IDS).logits


def _experts(model) -> list[SVDQExperts]:  # type: ignore[no-untyped-def]
    return [m for m in model.modules() if isinstance(m, SVDQExperts)]


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_routed_forward_is_the_eager_experts_forward(arch: str) -> None:
    """The generic routed loop hf_svdq runs (and calibrates inside) computes what each model's own experts do."""
    model = tiny_moe(arch)
    module = next(m for m in model.modules() if find_expert_stacks(m))
    hidden = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    index = torch.randint(0, 4, (7, 2), generator=torch.Generator().manual_seed(1))
    weights = torch.rand(7, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = module(hidden, index, weights)
        got = routed_forward(module, hidden, index, weights, dense_projection(module))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_every_architecture_compresses_its_experts_reloads_and_generates(arch: str, moe_checkpoint, tmp_path: Path) -> None:
    dense = _load(moe_checkpoint(arch))
    reference = _logits(dense)
    model = _load(moe_checkpoint(arch), SVDQuantConfig(rank=8, residual_bits=4, group_size=32))
    experts = _experts(model)
    assert experts and all(set(e.formats) == set(e.stacks) for e in experts)  # every stack of every MoE block
    compressed = _logits(model)
    assert (compressed - reference).abs().max() < 1.0 and torch.isfinite(compressed).all()
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    stack = f"{_name_of(model, experts[0])}.gate_up_proj"
    assert {stack, stack + "_scale", stack + "_zero", stack + "_u", stack + "_vh"} <= keys  # fused, not per expert
    reloaded = _load(tmp_path)
    assert len(_experts(reloaded)) == len(experts)
    torch.testing.assert_close(_logits(reloaded), compressed, rtol=0, atol=0)
    out = reloaded.generate(IDS[:1], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 6)
    stored = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    dense_size = sum(f.stat().st_size for f in Path(moe_checkpoint(arch)).glob("*.safetensors"))
    assert stored < 0.5 * dense_size
    coverage = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["coverage"]
    assert coverage["share_of_non_embedding"] >= 0.95, coverage


def _name_of(model, module) -> str:  # type: ignore[no-untyped-def]
    return next(n for n, m in model.named_modules() if m is module)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_quantize_on_load_factorizes_each_stack_as_it_arrives(arch: str, moe_checkpoint, tmp_path: Path) -> None:
    """Pure low rank compresses during loading: the op gets each merged stack (gpt-oss: transposed, with
    biases) and the result equals the model's own dequantized weights."""
    model = _load(moe_checkpoint(arch), SVDQuantConfig(rank=16))
    experts = _experts(model)
    assert experts and all(f.bits is None and f.rank == 16 for e in experts for f in e.formats.values())
    logits = _logits(model)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(_logits(_load(tmp_path)), logits, rtol=0, atol=0)
    model.dequantize()
    assert not _experts(model) and any(type(m).__name__.endswith("Experts") for m in model.modules())
    torch.testing.assert_close(_logits(model), logits, rtol=1e-4, atol=1e-4)


def test_dequantized_moe_saves_in_the_original_per_expert_format(moe_checkpoint, tmp_path: Path) -> None:
    model = _load(moe_checkpoint("qwen3_moe"), SVDQuantConfig(rank=8, residual_bits=4, group_size=32))
    logits = _logits(model)
    model.dequantize()
    model.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in keys  # transformers' own layout again
    torch.testing.assert_close(_logits(_load(tmp_path)), logits, rtol=1e-4, atol=1e-4)


def test_per_expert_calibration_and_its_data_free_fallback(moe_checkpoint, tmp_path: Path) -> None:
    """GPTQ + whitening per expert on the tokens routed to it; experts with fewer tokens than their input
    width fall back to data-free, and the count is recorded."""
    few = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3)).tolist()  # 16 tokens < width 64
    config = SVDQuantConfig(rank=8, residual_bits=4, group_size=32, residual_method="gptq", calibration={"input_ids": few})
    model = _load(moe_checkpoint("qwen3_moe"), config)
    coverage = model.config.quantization_config["coverage"] if isinstance(model.config.quantization_config, dict) \
        else model.config.quantization_config.coverage
    assert coverage["experts_calibrated_data_free"] == {"experts": 16, "of": 16}  # 2 blocks x 2 stacks x 4 experts
    many = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(4)).tolist()
    config = SVDQuantConfig(rank=8, residual_bits=4, group_size=32, residual_method="gptq", calibration={"input_ids": many})
    calibrated = _load(moe_checkpoint("qwen3_moe"), config)
    qc = calibrated.config.quantization_config
    coverage = qc["coverage"] if isinstance(qc, dict) else qc.coverage
    assert coverage.get("experts_calibrated_data_free", {"experts": 0})["experts"] < 16
    reference = _logits(_load(moe_checkpoint("qwen3_moe")))
    data_free = _logits(_load(moe_checkpoint("qwen3_moe"), SVDQuantConfig(rank=8, residual_bits=4, group_size=32)))
    # calibrated on in-distribution tokens, the output error is smaller than the data-free one
    assert (_logits(calibrated) - reference).pow(2).mean() < (data_free - reference).pow(2).mean()


def test_patterns_and_budgets_see_expert_stacks_as_layers(moe_checkpoint) -> None:
    path = moe_checkpoint("mixtral")
    model = _load(path, SVDQuantConfig(rank={"*.experts.gate_up_proj": 4, "*": 8}, residual_bits=4, group_size=32,
                                       skip=["*.experts.down_proj"]))
    for experts in _experts(model):
        assert set(experts.formats) == {"gate_up_proj"} and experts.formats["gate_up_proj"].rank == 4
        assert experts._parameters["down_proj"] is not None and experts._parameters["down_proj"].dim() == 3  # dense
    qc = model.config.quantization_config
    dense = qc["dense"] if isinstance(qc, dict) else qc.dense
    assert dense["model.layers.0.mlp.experts.down_proj"].startswith("skip pattern")
    budgeted = _load(path, SVDQuantConfig(target_bits_per_weight=6.0, residual_bits=4, group_size=64, rank_floor=4))
    stored = sum(e.storage_bytes() for e in _experts(budgeted))
    weights = sum(s.experts * s.out_features * s.in_features for e in _experts(budgeted) for s in e.stacks.values())
    ranks = {f.rank for e in _experts(budgeted) for f in e.formats.values()}
    assert 4.375 < 8 * stored / weights <= 6.5 and min(ranks) >= 4  # the budget gave the stacks ranks above the floor


def test_a_corrupt_expert_stack_is_refused_naming_the_tensor(moe_checkpoint, tmp_path: Path) -> None:
    model = _load(moe_checkpoint("qwen3_moe"), SVDQuantConfig(rank=8, residual_bits=4, group_size=32))
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.1.mlp.experts.down_proj_u"
    tensors[name] = tensors[name][:, :, :4].contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=name):
        _load(tmp_path)


def test_unsupported_experts_are_reported_never_left_dense_silently(moe_checkpoint, monkeypatch) -> None:
    """An experts class that does not follow transformers' interface stays dense, with a warning naming it."""
    import transformers.models.mixtral.modeling_mixtral as mixtral

    monkeypatch.delattr(mixtral.MixtralExperts, "_apply_gate", raising=False)
    original_init = mixtral.MixtralExperts.__init__

    def init(self, config):  # type: ignore[no-untyped-def]
        original_init(self, config)
        del self.is_transposed

    monkeypatch.setattr(mixtral.MixtralExperts, "__init__", init)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _load(moe_checkpoint("mixtral"), SVDQuantConfig(rank=8, residual_bits=4, group_size=32))
    assert not _experts(model)
    messages = [str(w.message) for w in caught if "cannot compress" in str(w.message)]
    assert messages and "MixtralExperts" in messages[0]


def test_inspect_and_model_card_report_experts_and_coverage(moe_checkpoint, tmp_path: Path) -> None:
    from hf_svdq.format.inspect import checkpoint_report, format_report
    from hf_svdq.publishing.model_card import build_model_card

    model = _load(moe_checkpoint("gpt_oss"), SVDQuantConfig(rank=8, residual_bits=4, group_size=32))
    model.save_pretrained(tmp_path)
    report = checkpoint_report(tmp_path)
    stacks = [r for r in report.layers if r.experts]
    assert len(stacks) == 4 and all(r.rank == 8 and r.experts == 4 for r in stacks)
    text = format_report(report)
    assert "4x128x64" in text and "coverage:" in text and "router" in text
    card = str(build_model_card(tmp_path, "user/tiny-gpt-oss-svdq"))
    assert "non-embedding parameters compressed" in card


def _awq_moe_reference(folder: Path, arch: str) -> torch.nn.Module:
    """An AWQ MoE folder read without hf_svdq: per-expert AWQ GEMM tensors (the published packing, tests/awq_reference)
    plus their PEFT LoRA pairs, stacked into the fused experts of a fresh transformers model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .awq_reference import dequantize_gemm

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    state = load_file(str(folder / "model.safetensors"))
    adapter = load_file(str(folder / "adapter" / "adapter_model.safetensors")) if (folder / "adapter").is_dir() else {}
    weights: dict[str, torch.Tensor] = {}
    for key in [k for k in state if k.endswith(".qweight")]:
        layer = key[: -len(".qweight")]
        w = dequantize_gemm(state[key], state[f"{layer}.qzeros"], state[f"{layer}.scales"], qc["group_size"])
        a, b = adapter.get(f"base_model.model.{layer}.lora_A.weight"), adapter.get(f"base_model.model.{layer}.lora_B.weight")
        weights[layer] = w + (b.float() @ a.float() if a is not None else 0)
    names = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2")}.get(arch, ("mlp", "gate_proj", "up_proj", "down_proj"))
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config).eval()
    loaded = {k.replace(f".{names[0]}.", ".mlp."): v.float() for k, v in state.items()
              if not k.endswith((".qweight", ".qzeros", ".scales"))}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.{names[0]}.experts"
        count = len({k.split(".")[5] for k in weights if k.startswith(prefix + ".")})
        gate = [weights[f"{prefix}.{e}.{names[1]}"] for e in range(count)]
        up = [weights[f"{prefix}.{e}.{names[2]}"] for e in range(count)]
        down = [weights[f"{prefix}.{e}.{names[3]}"] for e in range(count)]
        loaded[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
        loaded[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(down)
    for key in [k for k in weights if ".experts." not in k]:  # attention: plain Linear + LoRA
        loaded[f"{key}.weight"] = weights[key]
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    assert not unexpected and not [m for m in missing if "lm_head" not in m], (missing[:3], unexpected[:3])
    return model


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_awq_export_of_experts_reads_back_in_an_independent_reader(arch: str, moe_checkpoint, tmp_path: Path,
                                                                   monkeypatch) -> None:
    """Every expert as the per-expert AWQ layers vLLM's MoE loader reads (Mixtral's w1/w3/w2 under
    block_sparse_moe, else gate/up/down_proj), its correction as per-expert LoRA pairs; read back without
    hf_svdq, the model computes our logits (ours from the float reference path: the compiled decode kernels'
    int8 activations would add their own rounding to the comparison)."""
    from hf_svdq.kernels import backend
    from hf_svdq.publishing.exports import export

    monkeypatch.setenv(backend.BACKEND_ENV, "reference")
    backend.reset()

    model = _load(moe_checkpoint(arch), SVDQuantConfig(rank=8, residual_bits=4, group_size=32))
    model.save_pretrained(tmp_path / "ckpt")
    summary = export(tmp_path / "ckpt", tmp_path / "awq", format="awq-lora", progress=False)
    tensors = load_file(str(tmp_path / "awq" / "model.safetensors"))
    block, gate = ("block_sparse_moe", "w1") if arch == "mixtral" else ("mlp", "gate_proj")
    assert f"model.layers.0.{block}.experts.3.{gate}.qweight" in tensors
    assert not [k for k in tensors if "gate_up_proj" in k or k.endswith("experts.down_proj")]
    assert summary["dense_layers"][f"model.layers.0.{block}.gate"].startswith("router")
    assert summary["awq_int4_layers"] == 2 * (4 + 4 * 3)  # per block: q, k, v, o and 4 experts x gate, up, down
    reference = _awq_moe_reference(tmp_path / "awq", arch)
    ours, theirs = _logits(model), _logits(reference)
    backend.reset()
    assert (ours - theirs).abs().max() < 2e-3 * ours.abs().max()  # fp16 storage of the adapter and dense tensors


def test_awq_export_refuses_experts_it_cannot_quantize_alike(moe_checkpoint, tmp_path: Path) -> None:
    from hf_svdq.publishing.exports import export

    config = SVDQuantConfig(rank=8, residual_bits=4, group_size=32, layer_bits={"model.layers.1.mlp.experts.down_proj": 8})
    model = _load(moe_checkpoint("qwen3_moe"), config)
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"expert layer model\.layers\.1\.mlp\.experts\.0\.down_proj cannot be AWQ INT4"):
        export(tmp_path / "ckpt", tmp_path / "out", format="awq-lora")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("arch", "match"), [("qwen3_moe", "norm_topk_prob"), ("gpt_oss", "model_type")])
def test_gguf_export_refuses_moe_settings_llama_cpp_does_not_compute(arch: str, match: str, moe_checkpoint,
                                                                     tmp_path: Path) -> None:
    from hf_svdq.publishing.gguf_export import export_gguf

    model = _load(moe_checkpoint(arch), SVDQuantConfig(rank=8, residual_bits=4, group_size=32))
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=match):
        export_gguf(tmp_path / "ckpt", tmp_path / "out", progress=False)


def test_cli_aliases_resolve_to_the_cached_real_models(monkeypatch, tmp_path: Path) -> None:
    from hf_svdq import real_moe

    monkeypatch.setattr(real_moe, "smollm2_moe_checkpoint", lambda: tmp_path / "moe")
    monkeypatch.setattr(real_moe, "real_model_id", lambda model: "smollm2!" if model == "@smollm2" else model)
    assert real_moe.resolve_model_id("@smollm2-moe") == str(tmp_path / "moe")
    assert real_moe.resolve_model_id("@smollm2") == "smollm2!"
    assert real_moe.resolve_model_id("user/repo") == "user/repo"
