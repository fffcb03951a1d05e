"""Pull of an hf_svdq checkpoint from a pre-filled Hugging Face cache, offline, in a fresh process."""

from __future__ import annotations

import shutil

import torch
from transformers import AutoModelForCausalLM

from hf_svdq import SVDQuantConfig

from .hub_env import hub_env, logits_in_fresh_process


def test_offline_pull_from_a_prefilled_cache(tiny_checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=SVDQuantConfig(rank=8))
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    ids = torch.arange(1, 17).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        expected = model(ids).logits
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "home" / "hub" / "models--someone--tiny-svdq"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    shutil.copytree(saved, repo / "snapshots" / sha)
    env = hub_env(tmp_path / "home", endpoint="http://127.0.0.1:9", offline=True)
    logits, layer = logits_in_fresh_process("someone/tiny-svdq", env, tmp_path / "logits.pt")
    assert layer == "SVDQLinear"
    assert torch.equal(logits, expected)
