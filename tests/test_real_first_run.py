"""README command 1 on the real model: the recommended mode, its check, and its verdict."""

from __future__ import annotations

import json

import pytest

from hf_svdq import cli
from hf_svdq.evaluation.check import CANDIDATE_PROMPTS
from hf_svdq.evaluation.degeneration import detect_loop, units

pytestmark = pytest.mark.real


def test_recommended_mode_answers_sensibly(smollm2_path, tmp_path, capsys):
    out = tmp_path / "smollm2-svdq"
    assert cli.main(["compress", "@smollm2", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    check = result["check"]
    # the prompts: the 3 candidates SmolLM2 is surest of (first-token margins measured 4.19, 4.05, 3.26 nats:
    # gold, the largest ocean, the largest planet), not France (0.08: "The" vs "L" is a near tie)
    answers = check["answers"]
    assert check["prompts_picked"] and len(answers) == 3
    margins = [a["margin"] for a in answers]
    assert margins == sorted(margins, reverse=True) and margins[-1] > 2.0, margins
    assert all(a["prompt"] in CANDIDATE_PROMPTS and a["prompt"] != "What is the capital of France?" for a in answers)
    for a in answers:
        assert a["key_words"], a  # every dense answer has something to keep
        assert a["loops"] == (detect_loop(units(a["answer"])) is not None)
    assert 1.0 < check["perplexity_ratio"] <= 1.10, check
    # on prompts that are not near ties, the compressed model keeps the dense answers' content
    assert check["content_kept"] == 3, answers
    new_loops = sum(a["loops"] and not a["dense_loops"] for a in answers)
    assert check["healthy"] == (new_loops == 0 and check["content_kept"] >= 2 and check["perplexity_ratio"] <= 1.10)
    assert check["heldout_text"] == "emma_heldout.txt" and check["heldout_tokens"] >= 1000
    assert 4.9 <= result["bits_per_weight_compressed_layers"] <= 5.05
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["residual_bits"] == 4 and saved["group_size"] == 64
    assert saved["calibration"]["source"] == "dataset:austen"  # the bundled text, recorded without its data
    assert (out / "tokenizer.json").is_file()
