"""``export``: hand a compressed checkpoint to a serving engine, as one folder with its own card.

Formats: ``"gguf"`` (llama.cpp / Ollama: :mod:`hf_svdq.publishing.gguf_export`) and ``"awq-lora"`` (vLLM: an AWQ
base + a PEFT adapter, :mod:`hf_svdq.publishing.awq_export`). The folder is written atomically and carries
``hf_svdq_export.json`` (the manifest: format, source, sha256 of every file, the conversion summary) and a
``README.md`` that says how to run it; :func:`check_export` re-reads both before ``hf-svdq push``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub.utils.sha import sha_fileobj

from ..format.checkpoint import resolve_checkpoint
from ..format.output_folder import atomic_folder, check_output_folder

FORMATS = ("gguf", "awq-lora")
MANIFEST = "hf_svdq_export.json"
EXPORT_VERSION = 1
CARD = "README.md"
def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return sha_fileobj(handle).hex()


def export(checkpoint: str | Path, out_dir: str | Path, format: str = "gguf", *, overwrite: bool = False,
           dtype: str = "float16", progress: bool = True) -> dict[str, Any]:
    """Export ``checkpoint`` (a folder we wrote, or a Hub id) for a serving engine into ``out_dir``;
    returns the summary (files and bytes, tensor types, conversion errors) also kept in the manifest.

    ``dtype`` (``"float16"`` or ``"bfloat16"``) is the activation dtype of the AWQ export; GGUF ignores it.

    Raises:
        ValueError: an unknown format, an output folder that would overwrite something, or a checkpoint
            whose mode the format cannot hold (naming the format that can).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    source = resolve_checkpoint(checkpoint)
    check_output_folder(out_dir, [source], overwrite=overwrite)
    with atomic_folder(out_dir, overwrite=overwrite) as folder:
        if format == "gguf":
            from .gguf_export import export_gguf

            summary = export_gguf(source, folder, progress=progress).summary()
        else:
            from .awq_export import export_awq_lora

            summary = export_awq_lora(source, folder, dtype=dtype, progress=progress).summary()
        (folder / CARD).write_text(engine_card(format, summary, str(checkpoint)), encoding="utf-8")
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        manifest = {"export_version": EXPORT_VERSION, "format": format, "source": str(checkpoint),
                    "sha256": {p.relative_to(folder).as_posix(): _sha256(p) for p in files}, "summary": summary}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return summary


def check_export(folder: str | Path) -> dict[str, Any]:
    """The manifest of an export folder, after checking it is one we wrote and nothing in it changed:
    every listed file present with its sha256, no other files beside them, and the engine's own
    header readable (GGUF magic and tensor table; the AWQ config). ValueError naming the file otherwise."""
    root = Path(folder)
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        version, fmt_name, digests = manifest["export_version"], manifest["format"], dict(manifest["sha256"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not an hf_svdq export manifest ({err})") from None
    if version != EXPORT_VERSION or fmt_name not in FORMATS:
        raise ValueError(f"{path}: export_version {version!r} / format {fmt_name!r} is not one this hf_svdq writes "
                         f"(version {EXPORT_VERSION}, formats {FORMATS})")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST
               and not any(part.startswith(".") for part in p.relative_to(root).parts)}
    extra = sorted(present - set(digests))
    if extra:
        raise ValueError(f"{root}: {extra[:3]} not written by the export (not in {MANIFEST}); remove them or export again")
    for name, digest in sorted(digests.items()):
        file = root / name
        if not file.is_file() or file.is_symlink():
            raise FileNotFoundError(f"{root}: {name} listed in {MANIFEST} is missing")
        if _sha256(file) != digest:
            raise ValueError(f"{file} changed after the export (sha256 differs from {MANIFEST}); export again")
    if fmt_name == "gguf":
        import gguf

        for name in digests:
            if name.endswith(".gguf"):
                gguf.GGUFReader(str(root / name))  # raises on a bad magic, version or tensor table
    else:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
        if (config.get("quantization_config") or {}).get("quant_method") != "awq":
            raise ValueError(f"{root / 'config.json'} does not declare quant_method 'awq'")
    return manifest


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"


def engine_card(format: str, summary: dict[str, Any], source: str) -> str:
    """The README of an export folder: what it is and the commands that run it."""
    files = "\n".join(f"| `{name}` | {_size(size)} |" for name, size in summary["files"].items())
    if format == "gguf":
        lora = "lora.gguf" in summary["files"]
        adapter = " --lora lora.gguf" if lora else ""
        run = (f"```bash\nllama-cli -m model.gguf{adapter} -cnv\nllama-server -m model.gguf{adapter} --port 8080\n```\n\n"
               "Ollama: a `Modelfile` holding `FROM ./model.gguf`" + (" and `ADAPTER ./lora.gguf`" if lora else "")
               + ", then `ollama create my-model -f Modelfile && ollama run my-model`.\n\n"
               "The INT4 groups are Q4_1 blocks (exact up to the fp16 rounding of each block's offset); the low-rank "
               "correction is the LoRA adapter, applied at run time at scale 1 (`adapter.lora.alpha = 0`).")
        tags, library = ["gguf", "llama.cpp", "lora"], "gguf"
    else:
        rank = summary.get("lora_rank", 0)
        adapter = (f" \\\n  --enable-lora --lora-modules svdq=./adapter --max-lora-rank {rank}" if rank else "")
        run = (f"```bash\nvllm serve .{adapter}\n```\n\nvLLM reads `quant_method: awq` from `config.json` and picks its AWQ kernel (Marlin where the GPU has it). "
               + ("Requests name the adapter as the model: `\"model\": \"svdq\"`. " if rank else "")
               + "In Python: `AutoModelForCausalLM.from_pretrained(folder)` (transformers' AWQ path, needs `gptqmodel`)"
               + (", then `PeftModel.from_pretrained(model, folder + '/adapter')`." if rank else ".")
               + "\n\nThe INT4 groups are AWQ GEMM tensors (exact); the low-rank correction is a LoRA adapter of rank "
               f"{rank} (zero-padded to a rank vLLM accepts, `lora_alpha = r`). Layers AWQ cannot hold as INT4 are dense "
               "and listed in `modules_to_not_convert`.")
        tags, library = ["awq", "vllm", "lora", "peft"], "transformers"
    rounding = "\n".join(f"| {what} | {value:.3g} |" for what, value in summary.get("max_abs_rounding",
                                                                                  summary.get("q4_1_offset_rounding_max_abs", {})).items())
    tag_lines = "\n".join(f"- {t}" for t in ["hf_svdq", *tags])
    return (f"---\nlibrary_name: {library}\ntags:\n{tag_lines}\n---\n\n# {Path(source).name} ({format} export)\n\n"
            f"Exported by hf_svdq from `{source}`.\n\n## Run it\n\n{run}\n\n"
            f"## Files\n\n| file | size |\n|---|---|\n{files}\n\n## Conversion error (largest absolute change)\n\n"
            f"| what | max abs |\n|---|---|\n{rounding}\n\nVerify a download against the sha256 list in `{MANIFEST}`.\n")
