"""An interrupted streaming compression resumes from its last finished block.

The work folder holds, written atomically as each block finishes: the run's fingerprint
(``run.json``: source, settings, calibration tokens; a resume with anything different is refused,
naming it), each block's loss curves (budgeted runs), each compressed block's tensors and results,
and the calibration activations entering the next block of each pass. Compression is deterministic
for the same inputs and thread count, so a resumed run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..compression.blockwise import COMPRESS, CURVES

RUN_FILE = "run.json"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata={"format": "pt"})
    os.replace(partial, path)


def _atomic_text(text: str, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


class DiskJournal:
    """:class:`~hf_svdq.compression.blockwise.Journal` in a work folder."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any], resume: bool) -> None:
        self.folder = folder
        run = folder / RUN_FILE
        if run.is_file() and resume:
            recorded = json.loads(run.read_text())
            changed = sorted(k for k in set(recorded) | set(fingerprint) if recorded.get(k) != fingerprint.get(k))
            if changed:
                raise ValueError(f"cannot resume the compression in {folder}: {', '.join(changed)} differ from the "
                                 "interrupted run's; start afresh (without --resume) or use the same inputs")
        else:
            if folder.exists() and any(folder.iterdir()) and not resume:
                for stale in folder.iterdir():
                    if stale.is_file():
                        stale.unlink()
            folder.mkdir(parents=True, exist_ok=True)
            _atomic_text(json.dumps(fingerprint, indent=1, sort_keys=True), run)

    def block_file(self, index: int) -> Path:
        return self.folder / f"block-{index:05d}.safetensors"

    def _hidden_file(self, stage: str) -> Path:
        return self.folder / f"hidden-{stage}.safetensors"

    def resume(self, stage: str) -> tuple[int, list[torch.Tensor] | None]:
        path = self._hidden_file(stage)
        if not path.is_file():
            return 0, None
        saved = load_file(str(path))
        start = int(saved.pop("__next__").item())
        hidden = [saved[f"h{i}"] for i in range(len(saved))]
        return start, hidden or None

    def finished(self, stage: str, index: int, hidden: list[torch.Tensor], payload: dict[str, Any] | None) -> None:
        if stage == CURVES and payload is not None:
            flat: dict[str, torch.Tensor] = {}
            for name, curve in payload.items():
                if isinstance(curve, dict):
                    for bits, values in curve.items():
                        flat[f"{name}|{bits}"] = values
                else:
                    flat[name] = curve
            _atomic_save(flat, self.folder / f"curves-{index:05d}.safetensors")
        if stage == COMPRESS and payload is not None:
            _atomic_text(json.dumps(payload, sort_keys=True), self.folder / f"block-{index:05d}.json")
        state = {f"h{i}": h for i, h in enumerate(hidden)}
        state["__next__"] = torch.tensor(index + 1)
        _atomic_save(state, self._hidden_file(stage))

    def curves(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for path in sorted(self.folder.glob("curves-*.safetensors")):
            for key, values in load_file(str(path)).items():
                name, _, bits = key.partition("|")
                if bits:
                    out.setdefault(name, {})[int(bits)] = values
                else:
                    out[name] = values
        return out

    def results(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for path in sorted(self.folder.glob("block-*.json")):
            out.update(json.loads(path.read_text()))
        return out
