"""Calibration data: where it comes from, how it is tokenized, and what is recorded about it."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class CalibrationConfig:
    """Calibration samples for activation-aware compression.

    Give exactly one source: ``text`` (a string), ``file`` (a UTF-8 text file), ``texts`` (a list of
    strings, joined with blank lines) or ``input_ids`` (already tokenized, ``[n_samples, seq_len]``).
    Text is tokenized with ``tokenizer`` (default: the model's own) and cut into ``n_samples``
    evenly spaced, non-overlapping windows of ``seq_len`` tokens.

    ``sequential=True`` calibrates block by block on the outputs of the already-compressed blocks
    (GPTQ-style); ``False`` uses the dense model's activations for every layer, which can be cached
    in ``stats_cache`` (a folder) and reused across configs.
    """

    text: str | None = None
    file: str | None = None
    texts: Sequence[str] | None = None
    input_ids: Any = None
    n_samples: int = 64
    seq_len: int = 256
    tokenizer: str | None = None
    sequential: bool = True
    batch_size: int = 8
    stats_cache: str | None = None
    recorded: dict[str, Any] = field(default_factory=dict)  # summary read back from a saved config

    def __post_init__(self) -> None:
        sources = [name for name in ("text", "file", "texts", "input_ids") if getattr(self, name) is not None]
        if len(sources) > 1:
            raise ValueError(f"calibration: give one source, got {sources}")
        if not sources and not self.recorded:
            raise ValueError("calibration: give one of text, file, texts or input_ids")
        for name in ("n_samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"calibration.{name} must be a positive int, got {value!r}")
        if self.file is not None and not Path(self.file).is_file():
            raise ValueError(f"calibration.file {self.file!r} does not exist")
        if self.text is not None and not self.text.strip():
            raise ValueError("calibration.text is empty")
        if self.texts is not None and not any(t.strip() for t in self.texts):
            raise ValueError("calibration.texts is empty")

    @classmethod
    def coerce(cls, value: object) -> CalibrationConfig | None:
        """Accept a CalibrationConfig, a dict of its fields, a saved summary, or None."""
        if value is None or isinstance(value, CalibrationConfig):
            return value
        if isinstance(value, Mapping):
            if "sha256" in value:  # the summary written into config.json
                return cls(recorded=dict(value), n_samples=value.get("n_samples", 1), seq_len=value.get("seq_len", 1))
            unknown = set(value) - set(cls.__dataclass_fields__) - {"recorded"}
            if unknown:
                raise ValueError(f"calibration got unknown key(s) {sorted(unknown)}")
            return cls(**value)
        raise ValueError(f"calibration must be a CalibrationConfig or a dict, got {type(value).__name__}")

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
        return None

    def token_ids(self, tokenizer: Any) -> torch.Tensor:
        """``[n_samples, seq_len]`` int64 token ids; ValueError naming the numbers when too short."""
        if not self.has_data:
            raise ValueError("calibration data is not available (this config was read back from a saved checkpoint)")
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
            digest, source = hashlib.sha256(ids.numpy().tobytes()).hexdigest(), "input_ids"
            n_samples, seq_len = ids.shape
        else:
            text = self.raw_text() or ""
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            source = f"file:{Path(self.file).name}" if self.file else ("texts" if self.texts is not None else "text")
            n_samples, seq_len = self.n_samples, self.seq_len
        return {"source": source, "sha256": digest, "n_samples": int(n_samples), "seq_len": int(seq_len),
                "sequential": self.sequential}
