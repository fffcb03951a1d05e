"""AWQ + LoRA export (issue 12) for vLLM, read back by a reader written from AutoAWQ's published packing
(``tests/awq_reference.py``, not our writer) with the adapter applied by PEFT; and the export folder's
manifest, card and Hub push."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_svdq import SVDQuantConfig, export
from hf_svdq.algorithms.groupquant import quantize_rtn
from hf_svdq.cli import main
from hf_svdq.publishing.awq_export import AWQ_ORDER, pack_awq
from hf_svdq.publishing.exports import check_export

from .awq_reference import dequantize_gemm, load_awq_as_dense
from .hub_env import client_env


def _reference(folder):
    model = load_awq_as_dense(folder)
    return PeftModel.from_pretrained(model, folder / "adapter") if (folder / "adapter").is_dir() else model


def test_packing_reads_back_exactly_in_the_reference_reader():
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(0))
    for group in (32, 64, 128):
        q = quantize_rtn(w, 4, group)
        packed = pack_awq(q.codes, q.zero, q.scale)
        assert packed["qweight"].shape == (128, 3) and packed["qweight"].dtype == torch.int32
        assert packed["qzeros"].shape == (128 // group, 3) and packed["scales"].shape == (128 // group, 24)
        assert torch.equal(dequantize_gemm(packed["qweight"], packed["qzeros"], packed["scales"], group), q.dequantize())
    # output column c alone at 15 lands in nibble AWQ_ORDER.index(c) of the int32
    codes = torch.zeros(8, 1, dtype=torch.uint8)
    for column in range(8):
        codes.zero_()
        codes[column, 0] = 15
        word = int(pack_awq(codes, torch.zeros(8, 1, dtype=torch.uint8), torch.ones(8, 1))["qweight"][0, 0]) & 0xFFFFFFFF
        assert word == 15 << (4 * AWQ_ORDER.index(column))
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_awq(torch.zeros(12, 32, dtype=torch.uint8), torch.zeros(12, 1, dtype=torch.uint8), torch.ones(12, 1))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_tiny_export_reproduces_our_logits_through_awq_reader_and_peft(arch, tiny_checkpoint, tmp_path, input_ids):
    config = SVDQuantConfig(rank=5, residual_bits=4, group_size=32, layer_bits={"model.layers.0.self_attn.k_proj": 8})
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(arch), quantization_config=config)
    model.save_pretrained(tmp_path / "ckpt")
    summary = export(tmp_path / "ckpt", tmp_path / "awq", "awq-lora", progress=False)
    assert summary["lora_rank"] == 8  # rank 5 padded up to a rank vLLM accepts
    dense = summary["dense_layers"]
    assert dense["model.layers.0.self_attn.k_proj"] == "INT8 base"
    assert dense["model.layers.0.self_attn.q_proj"].startswith("vLLM fuses it with model.layers.0.self_attn.k_proj")
    assert "model.layers.0.mlp.up_proj" not in dense and dense["lm_head"] == "dense in the checkpoint"
    awq = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert awq == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32, "zero_point": True,
                   "modules_to_not_convert": sorted([*dense, "model.layers.0.self_attn.qkv_proj"])}
    adapter = json.loads((tmp_path / "awq" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == adapter["lora_alpha"] == 8 and adapter["peft_type"] == "LORA"
    # the base: exact (float32 value of AWQ's w = s (q - z)) for every INT4 layer
    tensors = load_file(str(tmp_path / "awq" / "model.safetensors"))
    layer = model.get_submodule("model.layers.1.mlp.gate_proj")
    theirs = dequantize_gemm(tensors["model.layers.1.mlp.gate_proj.qweight"], tensors["model.layers.1.mlp.gate_proj.qzeros"],
                             tensors["model.layers.1.mlp.gate_proj.scales"], 32)
    assert torch.equal(theirs, layer.base_weight(torch.float32))
    reference = _reference(tmp_path / "awq")
    with torch.no_grad():
        ours, theirs = model(input_ids).logits, reference(input_ids).logits
    assert (ours - theirs).abs().max() < 2e-3 * ours.abs().max()  # fp16 storage of the adapter and dense tensors
    assert check_export(tmp_path / "awq")["format"] == "awq-lora"
    card = (tmp_path / "awq" / "README.md").read_text()
    assert "vllm serve . \\\n  --enable-lora --lora-modules svdq=./adapter" in card and "--max-lora-rank 8" in card


def test_export_refuses_what_awq_cannot_hold(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama")
    AutoModelForCausalLM.from_pretrained(source, quantization_config=SVDQuantConfig(rank=8)).save_pretrained(tmp_path / "lr")
    with pytest.raises(ValueError, match="pure low-rank checkpoints have no quantized base"):
        export(tmp_path / "lr", tmp_path / "out1", "awq-lora", progress=False)
    config = SVDQuantConfig(rank=4, residual_bits=4, group_size=16)
    AutoModelForCausalLM.from_pretrained(source, quantization_config=config).save_pretrained(tmp_path / "g16")
    with pytest.raises(ValueError, match=r"group_size 16 is not one vLLM's AWQ kernels run \(32, 64, 128\)"):
        export(tmp_path / "g16", tmp_path / "out2", "awq-lora", progress=False)
    config = SVDQuantConfig(rank=4, residual_bits=4, group_size=32)
    AutoModelForCausalLM.from_pretrained(tiny_checkpoint("gpt2"), quantization_config=config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn is not an nn.Linear in 'gpt2'"):
        export(tmp_path / "gpt2", tmp_path / "out4", "awq-lora", progress=False)
    with pytest.raises(ValueError, match="format must be one of"):
        export(tmp_path / "g16", tmp_path / "out3", "onnx")
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()  # nothing half-written


def test_an_export_that_changed_is_not_pushed(tiny_checkpoint, tmp_path, hub_server):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"),
                                                 quantization_config=SVDQuantConfig(rank=4, residual_bits=4, group_size=32))
    model.save_pretrained(tmp_path / "ckpt")
    export(tmp_path / "ckpt", tmp_path / "awq", "awq-lora", progress=False)
    env = client_env(hub_server)
    cli = [sys.executable, "-m", "hf_svdq.cli", "push"]
    result = subprocess.run([*cli, str(tmp_path / "awq"), "user/tiny-awq"], env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    pull = ("import sys; from huggingface_hub import snapshot_download; "
            "print(snapshot_download('user/tiny-awq', local_dir=sys.argv[1]))")
    pulled = subprocess.run([sys.executable, "-c", pull, str(tmp_path / "pulled")], env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    folder = Path(pulled.stdout.strip().splitlines()[-1])
    assert check_export(folder)["format"] == "awq-lora"  # every file arrived with its sha256
    # export reads a checkpoint by Hub id too
    result = subprocess.run([*cli, str(tmp_path / "ckpt"), "user/tiny-ckpt"], env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run([sys.executable, "-m", "hf_svdq.cli", "export", "user/tiny-ckpt", str(tmp_path / "from-hub"),
                             "--format", "awq-lora"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = load_file(str(tmp_path / "awq" / "model.safetensors"))
    assert all(torch.equal(t, ours[k]) for k, t in load_file(str(tmp_path / "from-hub" / "model.safetensors")).items())
    assert (folder / "README.md").read_text() == (tmp_path / "awq" / "README.md").read_text()
    (tmp_path / "awq" / "notes.txt").write_text("not part of the export")
    with pytest.raises(ValueError, match=r"\['notes.txt'\] not written by the export"):
        check_export(tmp_path / "awq")
    (tmp_path / "awq" / "notes.txt").unlink()
    with (tmp_path / "awq" / "adapter" / "adapter_model.safetensors").open("r+b") as handle:
        handle.seek(-1, 2)
        handle.write(b"\x01")
    requests = len(hub_server.requests)
    result = subprocess.run([*cli, str(tmp_path / "awq"), "user/tiny-awq2"], env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode != 0 and "adapter_model.safetensors changed after the export" in result.stderr
    assert not [r for r in hub_server.requests[requests:] if r.method == "POST"]  # refused before any request


@pytest.mark.real
def test_smollm2_awq_export_matches_ours_in_the_reference_reader(smollm2_int4_r24, smollm2_path, tmp_path, capsys,
                                                                  numba_kernels):
    """SmolLM2 INT4 g64 + rank 24 (padded to 32): perplexity on held-out text and greedy tokens, ours vs
    the AWQ reader + PEFT (float32 compute of the fp16 export). Ours on the float-activation numba kernels:
    the compiled kernels' int8 activations are not what this compares."""
    from transformers import AutoTokenizer

    from hf_svdq.calibration.source import HELDOUT_TEXT
    from hf_svdq.kernels import backend

    folder = tmp_path / "ckpt"
    shutil.copytree(smollm2_int4_r24, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_path / name, folder / name)
    assert main(["export", str(folder), str(tmp_path / "awq"), "--format", "awq-lora"]) == 0
    printed = capsys.readouterr().out
    assert "vllm serve" in printed and "--max-lora-rank 32" in printed
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "awq")
    ids = tokenizer(HELDOUT_TEXT.read_text()[:4000], return_tensors="pt").input_ids[:, :256]
    ours_model = AutoModelForCausalLM.from_pretrained(smollm2_int4_r24)
    reference = _reference(tmp_path / "awq")

    def nll(model):
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])), logits

    (ours, ours_logits), (theirs, theirs_logits) = nll(ours_model), nll(reference)
    ratio = math.exp(theirs - ours)
    agree = float((ours_logits.argmax(-1) == theirs_logits.argmax(-1)).float().mean())
    print(f"AWQ+PEFT / ours perplexity {ratio:.5f}, top-1 agreement {agree:.4f}")
    assert abs(ratio - 1) < 0.002 and agree > 0.98
    for text in ("The capital of France is", "Once upon a time, in a small village,"):
        prompt = tokenizer(text, return_tensors="pt").input_ids
        kwargs = {"max_new_tokens": 16, "do_sample": False}
        with torch.no_grad():
            mine = ours_model.generate(prompt, **kwargs)[0, prompt.shape[1]:].tolist()
            theirs = reference.generate(prompt, **kwargs)[0, prompt.shape[1]:].tolist()
        agree = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), 16)
        print(f"greedy agreement {agree}/16 for {text!r}")
        assert backend.active().name == "numba"
        if agree < 16:  # only at a near-tie of ours (the export stores fp16: the embeddings move by ~1e-4)
            with torch.no_grad():
                logits = ours_model(torch.tensor([prompt[0].tolist() + mine[:agree]])).logits[0, -1]
            margin = float(logits[mine[agree]] - logits[theirs[agree]])
            print(f"  diverged at a margin of {margin:.4f} logits")
            assert 0 <= margin < 0.02


def _run_in_awq_env(folder, ids, tmp_path):
    """Logits of ``folder`` through transformers' AWQ path + PEFT in the environment ``HF_SVDQ_AWQ_PYTHON`` names."""
    python = os.environ.get("HF_SVDQ_AWQ_PYTHON")
    if not python:
        pytest.skip("set HF_SVDQ_AWQ_PYTHON to a Python with gptqmodel, optimum and peft (see .ci/run)")
    torch.save(ids, tmp_path / "ids.pt")
    runner = Path(__file__).with_name("awq_gptqmodel_run.py")
    result = subprocess.run([python, str(runner), str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"),
                             "torch_awq", "float16"], capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


@pytest.mark.slow
def test_mixed_export_in_transformers_own_awq_path(tiny_checkpoint, tmp_path, input_ids):
    """INT4 layers as AWQ, an INT8 k_proj (and its fused q/v) dense, the correction as PEFT LoRA."""
    config = SVDQuantConfig(rank=5, residual_bits=4, group_size=32, layer_bits={"model.layers.0.self_attn.k_proj": 8})
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=config)
    model.save_pretrained(tmp_path / "ckpt")
    export(tmp_path / "ckpt", tmp_path / "awq", "awq-lora", progress=False)
    theirs = _run_in_awq_env(tmp_path / "awq", input_ids, tmp_path)
    with torch.no_grad():
        ours = model(input_ids).logits
    # measured: 4.7e-4 (fp16 compute) against 3.0e-2 without the adapter; logits up to 1.19
    assert theirs["layer"] != "Linear"
    assert float((theirs["with_adapter"] - ours).abs().max()) < 3e-3 < float((theirs["base_only"] - ours).abs().max())


@pytest.mark.slow
@pytest.mark.real
def test_smollm2_awq_export_in_transformers_own_awq_path(smollm2_int4_r24, smollm2_path, tmp_path):
    """The engine-side check: transformers' AWQ loader (gptqmodel's CPU kernels) + PEFT, in the separate
    environment named by ``HF_SVDQ_AWQ_PYTHON`` (``.ci/run`` builds it). fp16 compute, as vLLM serves."""
    from transformers import AutoTokenizer

    from hf_svdq.calibration.source import HELDOUT_TEXT

    folder = tmp_path / "ckpt"
    shutil.copytree(smollm2_int4_r24, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_path / name, folder / name)
    export(folder, tmp_path / "awq", "awq-lora", progress=False)
    ids = AutoTokenizer.from_pretrained(tmp_path / "awq")(HELDOUT_TEXT.read_text()[:4000], return_tensors="pt").input_ids[:, :256]
    theirs = _run_in_awq_env(tmp_path / "awq", ids, tmp_path)
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(smollm2_int4_r24)(ids).logits.float()

    def nll(logits):
        return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))

    ratio, base_ratio = math.exp(nll(theirs["with_adapter"]) - nll(ours)), math.exp(nll(theirs["base_only"]) - nll(ours))
    agree = float((theirs["with_adapter"].argmax(-1) == ours.argmax(-1)).float().mean())
    print(f"{theirs['layer']}: perplexity {ratio:.4f}x ours (base alone {base_ratio:.4f}x), top-1 agreement {agree:.4f}")
    # measured (gptqmodel 7.6.0, torch_awq, fp16): 1.0005x, base alone 1.0255x, top-1 1.000
    assert theirs["layer"] != "Linear" and abs(ratio - 1) < 0.005 and agree > 0.97 and base_ratio > ratio + 0.01
