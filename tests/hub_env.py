"""Run Hub client code in a fresh Python process with a given endpoint/cache environment.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and friends at import time, so every pull
or push under test runs in its own interpreter (which is also what "a fresh process" means for users).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LOGITS = """
import sys, torch
from transformers import AutoModelForCausalLM
kwargs = eval(sys.argv[3]) if len(sys.argv) > 3 else {}
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], **kwargs)
ids = torch.arange(1, 17).unsqueeze(0) % model.config.vocab_size
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[2])
print(type(model.model.layers[0].self_attn.q_proj).__name__)
"""


def hub_env(home: Path, endpoint: str | None = None, token: str | None = "hf_test_token", offline: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") or k.startswith("HF_SVDQ")}
    env.update({"HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    if token:
        env["HF_TOKEN"] = token
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def run_python(code: str, env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


def logits_in_fresh_process(model_id: str, env: dict[str, str], out: Path, **kwargs: object) -> tuple[object, str]:
    """``from_pretrained(model_id, **kwargs)`` in a new interpreter; returns (logits, layer type name)."""
    import torch

    result = run_python(LOGITS, env, model_id, str(out), repr(kwargs))
    return torch.load(out), result.stdout.strip().splitlines()[-1]
