"""Run Hub client code in a fresh Python process with a given endpoint/cache environment.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and friends at import time, so every pull
or push under test runs in its own interpreter (which is also what "a fresh process" means for users).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .hub_server import HubServer

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
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


def logits_in_fresh_process(model_id: str, env: dict[str, str], out: Path, **kwargs: object) -> tuple[object, str]:
    """``from_pretrained(model_id, **kwargs)`` in a new interpreter; returns (logits, layer type name)."""
    import torch

    result = run_python(LOGITS, env, model_id, str(out), repr(kwargs))
    return torch.load(out), result.stdout.strip().splitlines()[-1]


def client_env(server: HubServer, *, token: str | None = "hf_test_token", hf_home: str | Path | None = None,
               env_extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a client process using ``server``: a fresh ``HF_HOME`` unless given, no token if None."""
    dropped = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
               "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_XET_CACHE", "HF_HUB_ENABLE_HF_TRANSFER")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    home = hf_home if hf_home is not None else tempfile.mkdtemp(prefix="hf_home-", dir=server.root / "clients")
    env.update({"HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home),
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    if token is not None:
        env["HF_TOKEN"] = token
    return {**env, **(env_extra or {})}


def run_client(server: HubServer, code: str, env_extra: dict[str, str] | None = None, *,
               token: str | None = "hf_test_token", hf_home: str | Path | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) in a fresh ``python -c`` whose Hub client talks to ``server``; output captured."""
    env = client_env(server, token=token, hf_home=hf_home, env_extra=env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
