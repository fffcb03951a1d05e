"""Calibration data: where it comes from, how it is tokenized, and what is recorded about it."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
BUNDLED_TEXT = DATA_DIR / "austen_calibration.txt"
"""Public-domain calibration text shipped in the package (see ``hf_svdq/data/README.md``)."""
HELDOUT_TEXT = DATA_DIR / "emma_heldout.txt"
"""A held-out passage (another novel) for quick quality checks; never used for calibration."""
DATASETS = ("austen", "model")
"""Named calibration sources: ``"austen"`` (the bundled text) and ``"model"`` (text sampled from the
model being compressed, seeded). ``"default"`` names the one measured to be better (README)."""
DEFAULT_DATASET = "austen"


@dataclass
class CalibrationConfig:
    """Calibration samples for activation-aware compression.

    Give exactly one source: ``text`` (a string), ``file`` (a UTF-8 text file), ``texts`` (a list of
    strings, joined with blank lines), ``input_ids`` (already tokenized, ``[n_samples, seq_len]``) or
    ``dataset`` (a name in :data:`DATASETS`, or ``"default"``). Text is tokenized with ``tokenizer``
    (default: the model's own) and cut into ``n_samples`` evenly spaced, non-overlapping windows of
    ``seq_len`` tokens. ``dataset="model"`` samples ``n_samples`` sequences from the model itself
    (temperature 1, ``seed``), which works for any language without shipped text.

    ``sequential=True`` calibrates block by block on the outputs of the already-compressed blocks
    (GPTQ-style); ``False`` uses the dense model's activations for every layer, which can be cached
    in ``stats_cache`` (a folder) and reused across configs.
    """

    text: str | None = None
    file: str | None = None
    texts: Sequence[str] | None = None
    input_ids: Any = None
    dataset: str | None = None
    n_samples: int = 64
    seq_len: int = 256
    tokenizer: str | None = None
    sequential: bool = True
    batch_size: int = 8
    stats_cache: str | None = None
    seed: int = 0
    recorded: dict[str, Any] = field(default_factory=dict)  # summary read back from a saved config

    def __post_init__(self) -> None:
        sources = [name for name in ("text", "file", "texts", "input_ids", "dataset") if getattr(self, name) is not None]
        if len(sources) > 1:
            raise ValueError(f"calibration: give one source, got {sources}")
        if not sources and not self.recorded:
            raise ValueError("calibration: give one of text, file, texts, input_ids or dataset")
        for name in ("n_samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"calibration.{name} must be a positive int, got {value!r}")
        if not isinstance(self.sequential, bool):
            raise ValueError(f"calibration.sequential must be True or False, got {self.sequential!r}")  # noqa: TRY004
        for name in ("tokenizer", "stats_cache"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), (str, os.PathLike)):
                raise ValueError(f"calibration.{name} must be a path or name, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"calibration.seed must be a non-negative int, got {self.seed!r}")
        if self.file is not None:
            if not isinstance(self.file, (str, os.PathLike)):
                raise ValueError(f"calibration.file must be a path, got {type(self.file).__name__}")
            self.file = os.fspath(self.file)
            if not Path(self.file).is_file():
                raise ValueError(f"calibration.file {self.file!r} does not exist or is not a regular file")
        if self.text is not None and (not isinstance(self.text, str) or not self.text.strip()):
            raise ValueError("calibration.text must be a non-empty string")
        if self.texts is not None:
            if isinstance(self.texts, str) or not all(isinstance(t, str) for t in self.texts):
                raise ValueError("calibration.texts must be a list of strings")
            if not any(t.strip() for t in self.texts):
                raise ValueError("calibration.texts is empty")
        if self.dataset is not None:
            if self.dataset == "default":
                self.dataset = DEFAULT_DATASET
            if self.dataset not in DATASETS:
                raise ValueError(f"calibration.dataset must be 'default' or one of {DATASETS}, got {self.dataset!r}")

    @classmethod
    def coerce(cls, value: object) -> CalibrationConfig | None:
        """What ``calibration=`` accepts: a CalibrationConfig, a dict of its fields, a saved summary,
        a list of strings (the texts), a dataset name (``"default"``, ``"austen"``, ``"model"``), a
        path to a UTF-8 text file (``str`` or ``os.PathLike``), or None."""
        if value is None or isinstance(value, CalibrationConfig):
            return value
        if isinstance(value, str):
            if value in (*DATASETS, "default"):
                return cls(dataset=value)
            if Path(value).is_file():
                return cls(file=value)
            raise ValueError(
                f"calibration={value!r} is neither a dataset name ('default', {', '.join(repr(d) for d in DATASETS)}) nor an "
                "existing text file; pass raw text as a list of strings (calibration=[text, ...])"
            )
        if isinstance(value, os.PathLike):
            return cls(file=os.fspath(value))
        if isinstance(value, (list, tuple)):
            if not value or not all(isinstance(t, str) for t in value):
                raise ValueError("calibration: a list must hold the calibration texts as non-empty strings")
            return cls(texts=list(value))
        if isinstance(value, Mapping):
            if "sha256" in value:  # the summary written into config.json
                return cls(recorded=dict(value), n_samples=value.get("n_samples", 1), seq_len=value.get("seq_len", 1))
            unknown = set(value) - set(cls.__dataclass_fields__) - {"recorded"}
            if unknown:
                raise ValueError(f"calibration got unknown key(s) {sorted(unknown)}")
            return cls(**value)
        raise ValueError(
            "calibration must be a CalibrationConfig, a dict, a list of strings, a dataset name or a path to a text file, "
            f"got {type(value).__name__}"
        )

    @classmethod
    def coerce_source(cls, value: object, n_samples: int, seq_len: int) -> CalibrationConfig:
        """:meth:`coerce` a source (a string, path or list; not None) and give it these window sizes."""
        given = cls.coerce(value)
        if given is None:
            raise ValueError("calibration: a source is needed here, got None")
        return dataclasses.replace(given, n_samples=n_samples, seq_len=seq_len)

    @property
    def has_data(self) -> bool:
        return not self.recorded

    def raw_text(self) -> str | None:
        if self.text is not None:
            return self.text
        if self.file is not None:
            return Path(self.file).read_text(encoding="utf-8")
        if self.texts is not None:
            return "\n\n".join(self.texts)
        if self.dataset == "austen":
            return BUNDLED_TEXT.read_text(encoding="utf-8")
        return None

    def token_ids(self, tokenizer: Any, model: Any = None) -> torch.Tensor:
        """``[n_samples, seq_len]`` int64 token ids; ValueError naming the numbers when too short.
        ``model`` is needed for ``dataset="model"`` (and must still be dense then)."""
        if not self.has_data:
            raise ValueError("calibration data is not available (this config was read back from a saved checkpoint)")
        if self.dataset == "model":
            if model is None:
                raise ValueError("calibration dataset 'model' samples text from the model: pass model= to token_ids")
            from .sampling import sample_token_ids

            ids = sample_token_ids(model, self.n_samples, self.seq_len, self.seed, self.batch_size)
            self.__dict__["_sampled"] = ids
            self.__dict__.pop("_summary", None)
            return ids
        if self.input_ids is not None:
            ids = torch.as_tensor(self.input_ids, dtype=torch.long, device="cpu")
            if ids.dim() != 2:
                raise ValueError(f"calibration.input_ids must be [n_samples, seq_len], got shape {tuple(ids.shape)}")
            return ids
        text = self.raw_text() or ""
        flat = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        needed = self.n_samples * self.seq_len
        if flat.numel() < needed:
            raise ValueError(
                f"calibration text has {flat.numel()} tokens but n_samples * seq_len = "
                f"{self.n_samples} * {self.seq_len} = {needed} are needed"
            )
        step = (flat.numel() - self.seq_len) // max(self.n_samples - 1, 1) if self.n_samples > 1 else 0
        step = max(step, self.seq_len)
        starts = [min(i * step, flat.numel() - self.seq_len) for i in range(self.n_samples)]
        return torch.stack([flat[s : s + self.seq_len] for s in starts])

    def summary(self) -> dict[str, Any]:
        """JSON-safe record of the calibration (no data) for the saved config."""
        if "_summary" not in self.__dict__:
            self.__dict__["_summary"] = self._summarize()
        return dict(self.__dict__["_summary"])

    def _summarize(self) -> dict[str, Any]:
        if self.recorded:
            return dict(self.recorded)
        if self.input_ids is not None:
            ids = torch.as_tensor(self.input_ids, dtype=torch.long, device="cpu")
            digest: str | None = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
            source = "input_ids"
            n_samples, seq_len = ids.shape
        elif self.dataset == "model":
            sampled = self.__dict__.get("_sampled")
            digest = None if sampled is None else hashlib.sha256(sampled.numpy().tobytes()).hexdigest()
            source, n_samples, seq_len = f"model (sampled, seed {self.seed})", self.n_samples, self.seq_len
        else:
            text = self.raw_text() or ""
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            source = (f"file:{Path(self.file).name}" if self.file else f"dataset:{self.dataset}" if self.dataset
                      else "texts" if self.texts is not None else "text")
            n_samples, seq_len = self.n_samples, self.seq_len
        return {"source": source, "sha256": digest, "n_samples": int(n_samples), "seq_len": int(seq_len),
                "sequential": self.sequential}


def calibration_tokenizer(calibration: CalibrationConfig, model_source: str | None) -> Any:
    """The tokenizer ``calibration`` needs (None when it brings token ids or samples from the model):
    ``calibration.tokenizer``, else the model's own from ``model_source``; ValueError naming the
    source when none loads."""
    from transformers import AutoTokenizer

    if calibration.input_ids is not None or calibration.dataset == "model":
        return None
    source = calibration.tokenizer or model_source
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if source and Path(source).is_dir() and not any((Path(source) / f).is_file() for f in tokenizer_files):
        # some transformers versions fall back to a useless default tokenizer here instead of failing
        raise ValueError(
            f"calibration needs a tokenizer: {source!r} has no tokenizer files; "
            "set calibration.tokenizer (a path or Hub id) or give calibration.input_ids"
        )
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"calibration needs a tokenizer: none could be loaded from {source!r} ({err.__class__.__name__}); "
            "set calibration.tokenizer (a path or Hub id) or give calibration.input_ids"
        ) from None
