"""GGUF export (issue 12): our INT4 groups as Q4_1 blocks, the correction as a LoRA adapter, read back by
independent readers: llama.cpp's gguf-py block decoder and transformers' GGUF loader (which undoes the
q/k permutation itself). The llama.cpp runtime check is in ``tests/test_llama_cpp.py``."""

from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_svdq import SVDQuantConfig
from hf_svdq.algorithms.groupquant import pack_codes, quantize_rtn
from hf_svdq.cli import main
from hf_svdq.publishing.gguf_export import export_gguf, permute_rows, q4_1_blocks


def test_q4_1_blocks_decode_to_our_values_in_llama_cpp_s_own_decoder():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    for group in (32, 64, 128):
        q = quantize_rtn(w, 4, group)
        data, offset_error = q4_1_blocks(pack_codes(q.codes, 4, group), q.scale, q.zero, group)
        assert data.shape == (8, 128 // 32 * 20) and data.dtype == np.uint8
        theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_1)
        ours = q.dequantize().numpy()
        # identical up to the fp16 rounding of each block's offset m = -z * s
        assert np.abs(theirs - ours).max() <= offset_error + 1e-7
        assert offset_error <= float(q.scale.float().max()) * 16 * 2**-11
    q = quantize_rtn(w[:, :96], 4, 48)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        q4_1_blocks(pack_codes(q.codes, 4, 48), q.scale, q.zero, 48)


def test_row_permutation_is_the_inverse_of_transformers_gguf_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.arange(24 * 4, dtype=torch.float32).reshape(24, 4)
    for heads in (1, 2, 3, 6):
        back = LlamaTensorProcessor()._reverse_permute_weights(permute_rows(w, heads).numpy(), heads, heads)
        assert torch.equal(torch.from_numpy(back), w)


@pytest.fixture(scope="module")
def exported(smollm2_int4_r24, smollm2_path, tmp_path_factory):
    """The shared SmolLM2 INT4 g64 + rank-24 checkpoint exported to GGUF (tokenizer from the dense folder)."""
    out = tmp_path_factory.mktemp("gguf")
    result = export_gguf(smollm2_int4_r24, out, tokenizer=smollm2_path, progress=False)
    return AutoModelForCausalLM.from_pretrained(smollm2_int4_r24), smollm2_int4_r24, out, result


@pytest.mark.real
def test_the_base_reads_back_through_transformers_gguf_loader(exported):
    model, _, out, result = exported
    assert result.adapter is not None and result.adapter.is_file()
    kinds = result.summary()["tensor_types"]
    assert kinds["Q4_1"] == 210 and "F32" in kinds  # every Linear as Q4_1; norms and embeddings float
    base = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.7.self_attn.k_proj", "model.layers.29.mlp.down_proj"):
        ours = model.get_submodule(name).base_weight(torch.float32)
        theirs = base.get_submodule(name).weight
        error = result.max_offset_error[name.rpartition(".")[2]]
        assert (theirs - ours).abs().max() <= error + 1e-6, name


@pytest.mark.real
def test_the_adapter_holds_the_correction_exactly(exported):
    model, _, out, _ = exported
    reader = gguf.GGUFReader(out / "lora.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 0.0
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    assert len(tensors) == 2 * 210
    layer = model.get_submodule("model.layers.5.mlp.up_proj")
    delta = tensors["blk.5.ffn_up.weight.lora_b"] @ tensors["blk.5.ffn_up.weight.lora_a"]
    assert torch.allclose(delta, layer.dequantize(torch.float32) - layer.base_weight(torch.float32), atol=1e-5)


@pytest.mark.real
def test_cli_export_writes_atomically_and_summarises(exported, smollm2_path, tmp_path, capsys):
    _, folder, _, _ = exported
    with_tokenizer = tmp_path / "ckpt"
    shutil.copytree(folder, with_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_path / name, with_tokenizer / name)
    assert main(["export", str(with_tokenizer), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert '"model.gguf"' in printed and "--lora" in printed
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "hf_svdq_export.json", "lora.gguf", "model.gguf"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "llama-cli -m model.gguf --lora lora.gguf" in card and "ADAPTER ./lora.gguf" in card
    from hf_svdq.publishing.exports import check_export

    assert check_export(tmp_path / "out")["summary"]["tensor_types"]["Q4_1"] == 210


def test_export_refuses_what_gguf_cannot_hold(tiny_checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=SVDQuantConfig(rank=8))
    model.save_pretrained(tmp_path / "lowrank")
    with pytest.raises(ValueError, match="pure low-rank checkpoints have no quantized base"):
        export_gguf(tmp_path / "lowrank", tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("gpt2"), quantization_config=SVDQuantConfig(rank=0, residual_bits=4, group_size=32))
    model.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"supports model_type \['llama', 'mixtral', 'qwen2', 'qwen3_moe'\]"):
        export_gguf(tmp_path / "gpt2", tmp_path / "out2")


@pytest.mark.real
def test_a_qwen2_export_reads_back_through_transformers_gguf_loader(qwen2_gguf_export):
    """Qwen2: no q/k permutation, q/k/v biases carried; transformers' GGUF loader reads every layer back."""
    compressed, out = qwen2_gguf_export
    ours = AutoModelForCausalLM.from_pretrained(compressed)
    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.fields["general.architecture"].contents() == "qwen2"
    base = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    for block in range(2):
        for kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"):
            name = f"model.layers.{block}.{kind}"
            theirs, mine = base.get_submodule(name), ours.get_submodule(name)
            scale = float(mine.base_weight(torch.float32).abs().max())
            assert (theirs.weight - mine.base_weight(torch.float32)).abs().max() <= scale * 2**-10, name  # m rounding
            if mine.bias is not None:
                assert torch.equal(theirs.bias, mine.bias.float()), name
    lora = {t.name for t in gguf.GGUFReader(out / "lora.gguf").tensors}
    assert len(lora) == 2 * 14 and "blk.1.attn_k.weight.lora_b" in lora
