"""Publishing hf_svdq checkpoints on the Hugging Face Hub (and any server speaking its protocol).

:func:`push_checkpoint` validates a saved folder, writes no file into it, and uploads it together with
a generated model card in **one** commit (``HfApi.create_commit``: the revision either gets every
file or none). :func:`push_model` does the same for a loaded model: ``save_pretrained`` plus the
tokenizer and generation config into a temporary folder, then :func:`push_checkpoint`. hf_svdq models
carry it as their ``push_to_hub`` (see :mod:`hf_svdq.integration.quantizer`), so the stock call publishes a
complete, reloadable repo with a card. Large files take the normal LFS path of ``huggingface_hub``.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..format import layout as fmt
from ..format.checkpoint import INDEX_FILE, SINGLE_FILE, TOKENIZER_FILES
from ..format.inspect import checkpoint_report
from ..integration.config import SVDQuantConfig
from ..real_model import SMOLLM2_HUB_ID, is_smollm2_checkpoint
from .exports import MANIFEST, check_export
from .model_card import HEATMAP, build_model_card, is_generated


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a valid ``user/name`` (or ``name``) Hub id; ValueError naming it otherwise."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo id {repo_id!r} is malformed: {err}") from None
    return repo_id


def check_checkpoint(folder: str | Path) -> dict[str, Any]:
    """Raise a clear error unless ``folder`` is a complete hf_svdq checkpoint; returns its config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a saved transformers checkpoint")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    qconfig = config.get("quantization_config")
    if not qconfig or qconfig.get("quant_method") != fmt.QUANT_METHOD:
        found = "no quantization_config" if not qconfig else f"quant_method {qconfig.get('quant_method')!r}"
        raise ValueError(f"{folder} is not an hf_svdq checkpoint ({found}); compress it first with `hf-svdq compress`")
    if not (folder / INDEX_FILE).is_file() and not (folder / SINGLE_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {SINGLE_FILE} (nor a sharded index)")
    SVDQuantConfig.from_dict(qconfig)  # the loader's config checks: format version, fields, no live calibration
    # reads the weight files through safetensors_files (index shards present, no stale single file beside
    # them) and checks every compressed layer's tensors in the headers
    report = checkpoint_report(folder)
    if not report.compressed:
        raise ValueError(f"{folder} records quant_method 'svdq' but holds no compressed layer")
    return config


UPLOAD_SUFFIXES = (".json", ".safetensors", ".md", ".txt", ".model", ".jinja", ".png")
"""What a model folder holds (config, weights, tokenizer, card, pictures); nothing else is uploaded."""
UPLOAD_NAMES = ("LICENSE", "NOTICE")


def upload_files(folder: str | Path) -> list[str]:
    """The files of ``folder`` that :func:`push_checkpoint` uploads (relative POSIX paths): an allow-list
    of model-folder files; hidden files and folders (``.git/``, ``.cache/``) are never uploaded, other
    files are left out with a warning, and a symlink is refused (its target could be any file)."""
    root = Path(folder)
    chosen, left_out = [], []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_symlink():
            raise ValueError(f"{path} is a symlink: push uploads only regular files of the folder (copy the file in)")
        if not path.is_file():
            continue
        if path.suffix in UPLOAD_SUFFIXES or path.name in UPLOAD_NAMES:
            chosen.append(rel.as_posix())
        else:
            left_out.append(rel.as_posix())
    if left_out:
        warnings.warn(f"push: not uploading {left_out[:5]}{' ...' if len(left_out) > 5 else ''} (not model-folder files; "
                      f"uploaded: {', '.join(UPLOAD_SUFFIXES)} and {', '.join(UPLOAD_NAMES)})", UserWarning, stacklevel=3)
    return chosen


def _token(token: str | bool | None) -> str:
    found = token if isinstance(token, str) else get_token()
    if not found:
        raise ValueError("no Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass token=...")
    return found


def base_model_of(folder_or_id: str | None) -> str | None:
    """The Hub id a checkpoint was compressed from, when it can be known (SmolLM2 cache, or a Hub id)."""
    if not folder_or_id:
        return None
    if is_smollm2_checkpoint(folder_or_id):
        return SMOLLM2_HUB_ID
    path = Path(folder_or_id)
    if path.exists():
        return None
    try:
        validate_repo_id(folder_or_id)
    except HFValidationError:
        return None
    return folder_or_id


def base_model_in_card(folder: str | Path) -> str | None:
    """``base_model`` from the YAML of a ``README.md`` in ``folder`` (e.g. the card ``hf-svdq compress`` wrote)."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    value = ModelCard.load(readme).data.base_model
    return value if isinstance(value, str) else None


def push_checkpoint(
    folder: str | Path, repo_id: str, *, private: bool | None = None, revision: str | None = None,
    token: str | None = None, commit_message: str | None = None, commit_description: str | None = None,
    create_pr: bool = False, card: bool = True, overwrite_card: bool = False, base_model: str | None = None,
    evaluation: Any = None, analysis_dir: str | Path | None = None, endpoint: str | None = None,
    tags: list[str] | None = None,
) -> Any:
    """Upload a saved hf_svdq checkpoint folder, or an ``hf-svdq export`` folder (GGUF, AWQ + adapter), as one
    commit; returns ``huggingface_hub.CommitInfo``. An export is checked against its manifest (every file's
    sha256, nothing added) and uploaded with the engine card it was written with.

    A ``README.md`` already in the folder is uploaded as is unless it was generated by hf_svdq or
    ``overwrite_card`` is set; otherwise the card is generated (never written into ``folder``).
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    if (folder / MANIFEST).is_file():  # an `hf-svdq export` folder: its files as written, with its engine card
        manifest = check_export(folder)
        generate = False
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel))
                      for rel in [*sorted(manifest["sha256"]), MANIFEST]]
    else:
        check_checkpoint(folder)
        readme = folder / "README.md"
        generate = card and (overwrite_card or not readme.is_file() or is_generated(readme.read_text(encoding="utf-8")))
        base_model = base_model or base_model_in_card(folder)
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel))
                      for rel in upload_files(folder) if not (generate and rel == "README.md")]
    api = HfApi(endpoint=endpoint, token=_token(token))
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = repo.repo_id
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    if generate:
        text = str(build_model_card(folder, repo_id, base_model=base_model, evaluation=evaluation, analysis_dir=analysis_dir,
                                    tags=tags))
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=text.encode("utf-8")))
        heatmap = Path(analysis_dir) / HEATMAP if analysis_dir else None
        if heatmap is not None and heatmap.is_file() and not (folder / HEATMAP).is_file():
            operations.append(CommitOperationAdd(path_in_repo=HEATMAP, path_or_fileobj=str(heatmap)))
    return api.create_commit(
        repo_id, operations, commit_message=commit_message or "Upload hf_svdq-compressed model",
        commit_description=commit_description, revision=revision, create_pr=create_pr,
    )


def _save_tokenizer(model: Any, folder: Path, tokenizer: Any) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        return
    source = Path(str(getattr(model, "name_or_path", "") or ""))
    if source.is_dir() and any((source / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source).save_pretrained(folder)


def push_model(model: Any, repo_id: str, *, tokenizer: Any = None, max_shard_size: str | int = "50GB", **kwargs: Any) -> Any:
    """``save_pretrained`` + tokenizer (given, or found next to the weights the model came from) +
    card, pushed as one commit. Keyword arguments as :func:`push_checkpoint`."""
    check_repo_id(repo_id)
    _token(kwargs.get("token"))
    kwargs.setdefault("base_model", base_model_of(getattr(model, "name_or_path", None)))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        type(model).save_pretrained(model, folder, max_shard_size=max_shard_size)
        _save_tokenizer(model, folder, tokenizer)
        return push_checkpoint(folder, repo_id, **kwargs)


def model_push_to_hub(
    self: Any, repo_id: str, commit_message: str | None = None, commit_description: str | None = None,
    private: bool | None = None, token: str | None = None, revision: str | None = None, create_pr: bool = False,
    max_shard_size: str | int = "50GB", tags: Any = None, **kwargs: Any,
) -> Any:
    """``push_to_hub`` of an hf_svdq model: transformers' signature; extra keywords (``tokenizer``,
    ``evaluation``, ``analysis_dir``, ``base_model``, ``card``) shape the repo and its card. A model
    whose layers were all dequantized pushes the stock way."""
    from ..nn.layers import COMPRESSED_LAYERS

    if not any(isinstance(m, COMPRESSED_LAYERS) for m in self.modules()):
        return type(self).push_to_hub(self, repo_id, commit_message=commit_message, commit_description=commit_description,
                                      private=private, token=token, revision=revision, create_pr=create_pr,
                                      max_shard_size=max_shard_size, tags=tags)
    return push_model(self, repo_id, max_shard_size=max_shard_size, commit_message=commit_message,
                      commit_description=commit_description, private=private, token=token, revision=revision,
                      create_pr=create_pr, tags=list(tags) if tags else None, **kwargs)
