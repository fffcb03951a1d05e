"""``hf-svdq export``: hand a compressed checkpoint to a serving engine (llama.cpp: GGUF + LoRA; vLLM: AWQ + LoRA)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("export", help="write a compressed checkpoint in a serving engine's format")
    p.add_argument("checkpoint", help="folder written by hf-svdq compress / save_pretrained, or a Hub id")
    p.add_argument("outdir", type=Path, help="output folder (written atomically)")
    p.add_argument("--format", choices=("gguf", "awq-lora"), default="gguf",
                   help="gguf: llama.cpp base model (INT4 as Q4_1) + LoRA adapter; awq-lora: vLLM AWQ folder + PEFT "
                        "adapter in adapter/ (the low-rank correction, in both)")
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16",
                   help="awq-lora: the dtype of its dense tensors and adapter (vLLM's activation dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")


def cmd_export(args: argparse.Namespace) -> int:
    from ..publishing.exports import export

    summary = export(args.checkpoint, args.outdir, args.format, overwrite=args.overwrite, dtype=args.dtype)
    print(json.dumps(summary, indent=2))
    if args.format == "gguf":
        lora = f" --lora {args.outdir / 'lora.gguf'}" if "lora.gguf" in summary["files"] else ""
        print(f"run it: llama-cli -m {args.outdir / 'model.gguf'}{lora} -p 'Hello'")
    else:
        rank = summary["lora_rank"]
        lora = f" --enable-lora --lora-modules svdq={args.outdir / 'adapter'} --max-lora-rank {rank}" if rank else ""
        print(f"run it: vllm serve {args.outdir}{lora}  (vLLM reads quant_method awq from config.json)")
    return 0
