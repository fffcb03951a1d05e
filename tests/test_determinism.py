"""Compressing the same model twice with the same inputs gives byte-identical files (issue 11, case 10).

Met for data-free compression (tiny models and SmolLM2). Not yet for calibrated compression: its runs
differ now and then (marked xfail with the measurement; the cause is not found yet)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from hf_svdq import SVDQuantConfig


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


COMPRESS = """
import sys, torch
from transformers import AutoModelForCausalLM
from hf_svdq import SVDQuantConfig
from hf_svdq.calibration import CalibrationConfig
source, out, mode = sys.argv[1:4]
torch.manual_seed(int(sys.argv[4]))  # the global RNG state must not matter
ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
if mode == "plain":
    config = SVDQuantConfig(rank=8)
elif mode == "calibrated_residual":
    config = SVDQuantConfig(target_bits_per_weight=6.0, residual_bits=4, group_size=32, refine_steps=1, rank_floor=0,
                            calibration=CalibrationConfig(input_ids=ids))
else:
    config = SVDQuantConfig(rank=8, calibration=CalibrationConfig(dataset="model", n_samples=2, seq_len=16))
AutoModelForCausalLM.from_pretrained(source, quantization_config=config).save_pretrained(out)
"""


CALIBRATED_FLAKES = pytest.mark.xfail(
    strict=False,
    reason="open (issue 11 case 10): calibrated compression is not yet byte-identical run to run; measured in fresh "
           "processes: dataset='model' differed in 4-40 of 56 tensors in 4 of 5 runs, input_ids calibration in ~1 of 6",
)


@pytest.mark.parametrize("mode", ["plain", pytest.param("calibrated_residual", marks=CALIBRATED_FLAKES),
                                  pytest.param("model_sampled", marks=CALIBRATED_FLAKES)])
def test_two_compressions_write_the_same_bytes(tiny_checkpoint, tmp_path, mode):
    """Two separate runs (fresh processes, as two CLI invocations are), different global seeds."""
    source = tiny_checkpoint("llama")
    for run in range(2):
        subprocess.run([sys.executable, "-c", COMPRESS, str(source), str(tmp_path / str(run)), mode, str(1000 + run)],
                       check=True, capture_output=True, timeout=300)
    assert _digests(tmp_path / "0") == _digests(tmp_path / "1")


@pytest.mark.real
def test_the_real_model_compresses_to_the_same_bytes_twice(smollm2_path, tmp_path):
    """SmolLM2-135M, INT4 round-to-nearest base + rank-16 correction (data-free: one SVD per layer)."""
    digests = []
    for run in range(2):
        config = SVDQuantConfig(rank=16, residual_bits=4, group_size=64)
        model = AutoModelForCausalLM.from_pretrained(smollm2_path, quantization_config=config)
        model.save_pretrained(tmp_path / str(run))
        del model
        digests.append(_digests(tmp_path / str(run)))
    assert digests[0] == digests[1]
