"""``hf-svdq export``: hand a compressed checkpoint to a serving engine (llama.cpp: GGUF + LoRA)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("export", help="write a compressed checkpoint in a serving engine's format")
    p.add_argument("checkpoint", help="folder written by hf-svdq compress / save_pretrained, or a Hub id")
    p.add_argument("outdir", type=Path, help="output folder (written atomically)")
    p.add_argument("--format", choices=("gguf",), default="gguf",
                   help="gguf: llama.cpp base model (INT4 as Q4_1) + LoRA adapter (the low-rank correction)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")


def cmd_export(args: argparse.Namespace) -> int:
    from huggingface_hub import snapshot_download

    from .export_gguf import export_gguf
    from .output_folder import atomic_folder, check_output_folder

    source = Path(args.checkpoint)
    if not source.is_dir():
        source = Path(snapshot_download(args.checkpoint, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]))
    check_output_folder(args.outdir, [source], overwrite=args.overwrite)
    with atomic_folder(args.outdir, overwrite=args.overwrite) as folder:
        result = export_gguf(source, folder)
        summary = result.summary()
    print(json.dumps(summary, indent=2))
    lora = f" --lora {args.outdir / 'lora.gguf'}" if "lora.gguf" in summary["files"] else ""
    print(f"run it: llama-cli -m {args.outdir / 'model.gguf'}{lora} -p 'Hello'")
    return 0
