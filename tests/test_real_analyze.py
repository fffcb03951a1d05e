"""``hf-svdq analyze`` on the real SmolLM2-135M-Instruct, at CI size (module-type groups, short probes)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from hf_svdq import SVDQuantConfig
from hf_svdq.cli import main

pytestmark = pytest.mark.real


def test_analyze_cli_writes_report_heatmap_and_a_loadable_policy(smollm2_path, text_dir, tmp_path, capsys):
    out = tmp_path / "analysis"
    code = main(["analyze", str(smollm2_path), "--text", str(text_dir / "mansfieldpark.txt"), "--out", str(out),
                 "--mode", "residual", "--rank", "16", "--group", "type", "--probes", "alone", "--eval-tokens", "256",
                 "--prompts", "1", "--max-new-tokens", "8", "--pillars", "protect"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["families"]) == {"attention", "mlp"}
    for name in ("report.md", "report.json", "policy.json", "sensitivity_heatmap.png", "policy_ranks.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 210 and len(report["groups"]) == 7
    assert report["all_compressed"]["kl"] > max(m["kl"] for m in report["probes"]["alone"].values()) > 0
    setting_bits = 8 * sum(r["compressed_bytes"] for r in report["layers"]) / sum(r["out_features"] * r["in_features"]
                                                                                  for r in report["layers"])
    policy = json.loads((out / "policy.json").read_text())
    assert policy["predicted"]["bits_per_weight"] <= setting_bits + 1e-9  # default budget: the setting's own bytes
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, quantization_config=SVDQuantConfig.from_policy(out / "policy.json"))
    assert model.config.quantization_config.ranks == policy["ranks"]
