"""Evaluation and calibrated modes on the real SmolLM2-135M-Instruct (kept small enough for CI)."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_svdq import SVDQuantConfig
from hf_svdq.calibration.source import CalibrationConfig
from hf_svdq.cli import main
from hf_svdq.evaluation.metrics import EvalSettings, perplexity_and_agreement, tokenize_text

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def setup(smollm2_path, text_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    dense = AutoModelForCausalLM.from_pretrained(smollm2_path)
    ids = tokenize_text(tokenizer, (text_dir / "prideprejudice.txt").read_text(), 1024)
    return tokenizer, dense, ids


def test_perplexity_matches_transformers_loss(setup):
    _, dense, ids = setup
    ours = perplexity_and_agreement(dense, ids, EvalSettings(window=1024, stride=1024, max_tokens=1024), progress=False)
    with torch.no_grad():
        reference = math.exp(float(dense(ids, labels=ids).loss))
    assert ours["tokens"] == 1023
    assert ours["perplexity"] == pytest.approx(reference, rel=1e-4)


def test_eval_cli_against_itself(smollm2_path, text_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a color.\nWhat is two plus two?\n")
    out = tmp_path / "eval.json"
    code = main(["eval", str(smollm2_path), "--text", str(text_dir / "prideprejudice.txt"), "--reference", str(smollm2_path),
                 "--max-tokens", "512", "--window", "256", "--stride", "128", "--max-new-tokens", "12",
                 "--prompts", str(prompts), "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    quality = result["quality"]
    assert quality["perplexity_ratio"] == pytest.approx(1.0) and quality["kl"] == pytest.approx(0.0, abs=1e-9)
    assert quality["top1_agreement"] == 1.0 and len(result["generation"]["samples"]) == 2
    assert "perplexity ratio" in capsys.readouterr().out


def test_calibrated_residual_beats_round_to_nearest(smollm2_path, text_dir, setup):
    """Attention layers only, to fit CI: INT4 g64 RTN vs GPTQ + whitened rank-16 correction."""
    _, dense, ids = setup
    calibration = CalibrationConfig(file=str(text_dir / "sensesensibility.txt"), n_samples=16, seq_len=128)
    settings = EvalSettings(window=512, stride=512, max_tokens=1024)
    common = {"residual_bits": 4, "group_size": 64, "skip": ["*.mlp.*"]}
    rtn = AutoModelForCausalLM.from_pretrained(smollm2_path, quantization_config=SVDQuantConfig(rank=0, **common))
    ours = AutoModelForCausalLM.from_pretrained(
        smollm2_path, quantization_config=SVDQuantConfig(rank=16, calibration=calibration, **common)
    )
    kl_rtn = perplexity_and_agreement(rtn, ids, settings, dense, progress=False)["kl"]
    kl_ours = perplexity_and_agreement(ours, ids, settings, dense, progress=False)["kl"]
    assert kl_ours < 0.6 * kl_rtn
