"""The real SmolLM2-135M-Instruct, compressed, pushed to the local Hub-protocol server and pulled back."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from .hub_env import LOGITS, client_env

pytestmark = pytest.mark.real

PUSH = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from hf_svdq import SVDQuantConfig
from hf_svdq.evaluation.metrics import EvalSettings, evaluate
path, text, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=SVDQuantConfig(rank=0, residual_bits=4, group_size=64))
tokenizer = AutoTokenizer.from_pretrained(path)
reference = AutoModelForCausalLM.from_pretrained(path)
result = evaluate(model, tokenizer, open(text).read(), reference, EvalSettings(max_tokens=512, max_new_tokens=8, speed_tokens=8),
                  prompts=("What is the capital of France?",), progress=False)
result["text"] = text
info = model.push_to_hub("user/smollm2-135m-svdq", evaluation=result)
ids = torch.arange(1, 17).unsqueeze(0) % model.config.vocab_size
with torch.no_grad():
    torch.save(model(ids).logits, out)
print(json.dumps({"oid": info.oid, "perplexity": result["quality"]["perplexity"]}))
"""


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout.strip().splitlines()[-1]


def test_smollm2_push_pull_round_trip_with_a_card(hub_server, smollm2_path, text_dir, tmp_path):
    env = client_env(hub_server)
    pushed = json.loads(_ok(subprocess.run([sys.executable, "-c", PUSH, str(smollm2_path), str(text_dir / "prideprejudice.txt"),
                                            str(tmp_path / "pushed.pt")], env=env, capture_output=True, text=True, timeout=900, check=False)))
    files = hub_server.head("user/smollm2-135m-svdq").files
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md"} <= set(files)
    assert files["model.safetensors"].lfs
    pull_env = client_env(hub_server)
    layer = _ok(subprocess.run([sys.executable, "-c", LOGITS, "user/smollm2-135m-svdq", str(tmp_path / "pulled.pt"), "{}"],
                               env=pull_env, capture_output=True, text=True, timeout=900, check=False))
    assert layer == "SVDQResidualLinear"
    assert torch.equal(torch.load(tmp_path / "pulled.pt"), torch.load(tmp_path / "pushed.pt"))
    read = ("from huggingface_hub import hf_hub_download; import json, pathlib;"
            "print(json.dumps(pathlib.Path(hf_hub_download('user/smollm2-135m-svdq', 'README.md')).read_text()))")
    card = _ok(subprocess.run([sys.executable, "-c", read],
                              env=pull_env, capture_output=True, text=True, timeout=300, check=False))
    card = json.loads(card)
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card
    assert f"| perplexity | {pushed['perplexity']:.3f} |" in card and "prideprejudice.txt" in card
    assert "| `self_attn.q_proj` | 30 | 0 |" in card
