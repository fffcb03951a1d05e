"""Sensitivity analysis on a GPT-Neo architecture.

No GPT-Neo weights can be downloaded here, and a random model says nothing about sensitivity, so this
trains a small GPT-Neo (4 blocks, hidden 256, alternating global/local attention like GPT-Neo-1.3B,
SmolLM2's tokenizer) from scratch on sensesensibility.txt + mansfieldpark.txt for a few minutes on
the CPU, caches it, and runs ``hf-svdq analyze`` on it (probes on prideprejudice.txt).

    python benchmarks/gpt_neo_sensitivity.py [--steps 400] [--out benchmarks/results/analysis-gpt-neo]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, GPTNeoConfig, GPTNeoForCausalLM

from hf_svdq import smollm2_checkpoint
from hf_svdq.cli import main as cli
from hf_svdq.real_model import cache_root

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"


def train(folder: Path, steps: int, seq_len: int = 128, batch: int = 8) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    text = (TEXT / "sensesensibility.txt").read_text() + "\n\n" + (TEXT / "mansfieldpark.txt").read_text()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    torch.manual_seed(0)
    config = GPTNeoConfig(vocab_size=len(tokenizer), hidden_size=256, num_layers=4, num_heads=8, intermediate_size=1024,
                          attention_types=[[["global", "local"], 2]], window_size=64, max_position_embeddings=512,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPTNeoForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch,), generator=generator)
        x = torch.stack([ids[s : s + seq_len] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f}s", flush=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "TRAINED").write_text(f"{steps} steps, batch {batch} x {seq_len}, final loss {loss.item():.3f}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/analysis-gpt-neo"))
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()
    folder = cache_root() / f"gpt-neo-4x256-trained-{args.steps}"
    if args.retrain or not (folder / "TRAINED").is_file():
        train(folder, args.steps)
    print((folder / "TRAINED").read_text())
    raise SystemExit(cli(["analyze", str(folder), "--text", str(TEXT / "prideprejudice.txt"), "--calibration",
                          str(TEXT / "sensesensibility.txt"), "--out", str(args.out), "--eval-tokens", "1024", "--max-new-tokens", "24"]))


if __name__ == "__main__":
    main()
