"""Calibration text sampled from the model itself (``CalibrationConfig(dataset="model")``).

Data-free calibration in the spirit of LLM-QAT: each sequence starts from the model's BOS token and
is sampled at temperature 1 (no top-k/top-p, EOS suppressed until the sequence is full), so the
activations follow the model's own distribution. Seeded and deterministic for a given model, seed,
torch version and machine; the global RNG state is left untouched.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)


def _start_token(model: Any) -> int:
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        for name in ("bos_token_id", "decoder_start_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return 0


def sample_token_ids(model: Any, n_samples: int, seq_len: int, seed: int = 0, batch_size: int = 8) -> torch.Tensor:
    """``[n_samples, seq_len]`` int64 token ids sampled from ``model`` (a causal LM with ``generate``)."""
    if not hasattr(model, "generate"):
        raise ValueError(f"calibration dataset 'model' needs a generative model, got {type(model).__name__}")
    start = time.perf_counter()
    device = next(model.parameters()).device
    bos = _start_token(model)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    rows = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for first in range(0, n_samples, batch_size):
            count = min(batch_size, n_samples - first)
            prompt = torch.full((count, 1), bos, dtype=torch.long, device=device)
            out = model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                pad_token_id=eos if isinstance(eos, int) else bos,
            )
            rows.append(out[:, :seq_len].cpu())
    ids = torch.cat(rows)
    logger.info("hf_svdq: sampled %d x %d calibration tokens from the model in %.1f s", n_samples, seq_len,
                time.perf_counter() - start)
    return ids
