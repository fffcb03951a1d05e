"""README command 1 on the real model: the recommended mode, its check, and its verdict."""

from __future__ import annotations

import json

import pytest

from hf_svdq import cli
from hf_svdq.evaluation.degeneration import detect_loop, units

pytestmark = pytest.mark.real


def test_recommended_mode_answers_sensibly(smollm2_path, tmp_path, capsys):
    out = tmp_path / "smollm2-svdq"
    assert cli.main(["compress", "@smollm2", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    check = result["check"]
    assert check["prompt"] == "What is the capital of France?"
    assert "Paris" in check["dense_answer"], check
    # the verdict is what the loop detector and the perplexity ratio say, nothing else
    loops = detect_loop(units(check["answer"])) is not None
    assert check["loops"] == loops
    assert 1.0 < check["perplexity_ratio"] <= 1.10, check
    assert check["healthy"] == (not loops or check["dense_loops"]), check
    # Not asserted: that the compressed answer names Paris. The dense model's first token is a near tie
    # ("The" -1.88 vs "L" -1.97 nats), and of two identical compressions one answered "The capital of
    # France is Paris." and the other "L'Etoile, la Marseillaise, la Cite, ..." (README, issue 10 note).
    assert check["heldout_text"] == "emma_heldout.txt" and check["heldout_tokens"] >= 1000
    assert 4.9 <= result["bits_per_weight_compressed_layers"] <= 5.05
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["residual_bits"] == 4 and saved["group_size"] == 64
    assert saved["calibration"]["source"] == "dataset:austen"  # the bundled text, recorded without its data
    assert (out / "tokenizer.json").is_file()
