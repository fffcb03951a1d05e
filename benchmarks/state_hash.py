"""Bytes of compression, per mode, as hashes: run it under two checkouts and diff, to show a refactor
changed no number.

Compresses the first 3 blocks of SmolLM2-135M-Instruct (the rest skipped) in nine modes, one at a
time, and prints one JSON line per mode: a sha256 prefix of the state dict (names and raw bytes) and
of the saved ``quantization_config``. Calibrated modes use 8 x 128 tokens of sensesensibility.txt.
Run single-threaded (``OMP_NUM_THREADS=1``) on both sides: float reductions depend on the thread count.

    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/old/checkout python benchmarks/state_hash.py > old.jsonl
    OMP_NUM_THREADS=1 python benchmarks/state_hash.py > new.jsonl && diff old.jsonl new.jsonl
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hf_svdq import SVDQuantConfig, smollm2_checkpoint
from hf_svdq.calibration.source import CalibrationConfig

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "sensesensibility.txt"


def modes() -> dict[str, dict[str, object]]:
    text = TEXT.read_text(encoding="utf-8")[:200_000]
    cal = CalibrationConfig(text=text, n_samples=8, seq_len=128, batch_size=4)
    residual = {"residual_bits": 4, "group_size": 64, "calibration": cal}
    return {
        "lowrank r16 on load": {"rank": 16},
        "whitened energy": {"energy": 0.8, "calibration": cal},
        "param ratio": {"target_param_ratio": 0.4},
        "rtn int8 r0": {"rank": 0, "residual_bits": 8, "group_size": None},
        "mse int4 r8 refine2": {"rank": 8, "residual_bits": 4, "group_size": 64, "residual_method": "mse", "refine_steps": 2},
        "gptq 5bpw refine1": {"target_bits_per_weight": 5.0, "refine_steps": 1, **residual},
        "mixed 4.5 [4,8]": {"target_bits_per_weight": 4.5, "bit_choices": [4, 8], **residual},
        "mixed 6.0 [4,8]": {"target_bits_per_weight": 6.0, "bit_choices": [4, 8], **residual},
        "gptq non-sequential": {"rank": 16, "residual_bits": 4, "group_size": 48,
                                "calibration": CalibrationConfig(text=text, n_samples=8, seq_len=128, sequential=False)},
    }


def main(only: list[str]) -> None:
    warnings.filterwarnings("ignore")
    path = smollm2_checkpoint()
    skip = [r"re:model\.layers\.([3-9]|[1-9][0-9])\..*"]
    for name, kwargs in modes().items():
        if only and name not in only:
            continue
        config = SVDQuantConfig(skip=skip, **kwargs)  # type: ignore[arg-type]
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
        state = hashlib.sha256()
        for key, tensor in sorted(model.state_dict().items()):
            state.update(key.encode())
            state.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        saved = model.config.quantization_config.to_dict()
        print(json.dumps({"mode": name, "state": state.hexdigest()[:16],
                          "config": hashlib.sha256(json.dumps(saved, sort_keys=True).encode()).hexdigest()[:12],
                          "rank_sum": sum(saved["ranks"].values()), "layer_bits": saved["layer_bits"]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
