import json

import pytest

from hf_svdq.cli import main


def test_compress_then_inspect(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "compressed"
    code = main(["compress", str(tiny_checkpoint("llama")), str(out), "--rank-map", '{"*.self_attn.*": 8}', "--skip", "*.o_proj", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers_compressed"] == 6  # q, k, v of 2 blocks
    assert summary["bytes_stored"] < summary["bytes_dense"]
    assert 0 < summary["bits_per_weight_compressed_layers"] < 32

    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in table and "skip pattern '*.o_proj'" in table
    assert "no rank pattern matched" in table  # the MLPs
    assert "layers compressed: 6, kept dense: 9" in table


def test_compress_rank_and_dtype(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["compress", str(tiny_checkpoint("gpt2")), str(out), "--rank", "8", "--dtype", "bfloat16"]) == 0
    text = capsys.readouterr().out
    assert "layers compressed: 8" in text and "bits per weight" in text
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rank", "0"], "rank must be a positive int, got 0"),
        (["--rank-map", '{"*.q_proj": -1}'], "rank['*.q_proj'] must be a positive int, got -1"),
        (["--rank", "8", "--skip", "re:("], "invalid regular expression 're:('"),
    ],
)
def test_compress_bad_input_is_a_clear_error(argv, message, tiny_checkpoint, tmp_path, capsys):
    assert main(["compress", str(tiny_checkpoint("llama")), str(tmp_path / "x"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_rank_map_must_be_json_object(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compress", str(tiny_checkpoint("llama")), str(tmp_path / "x"), "--rank-map", "[1, 2]"])
    assert "JSON object" in capsys.readouterr().err


def test_inspect_rejects_folder_without_config(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_compress_residual_mode_from_cli(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "res"
    code = main(["compress", str(tiny_checkpoint("llama")), str(out), "--rank", "4", "--residual-bits", "4",
                 "--group-size", "32", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers_compressed"] == 14
    assert 4.0 < summary["bits_per_weight_compressed_layers"] < 8.0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["residual_bits"] == 4 and config["residual_method"] == "rtn"


def test_compress_policy_flags_are_exclusive(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compress", str(tiny_checkpoint("llama")), str(tmp_path / "x"), "--rank", "4", "--energy", "0.9"])
    assert "not allowed with" in capsys.readouterr().err


def test_compress_with_a_policy_file(tiny_checkpoint, tmp_path, capsys):
    folder = tiny_checkpoint("llama")
    ranks = {f"model.layers.{i}.self_attn.{p}": 8 for i in range(2) for p in ("q_proj", "o_proj")}
    policy = {"hf_svdq_policy": 1, "setting": {"calibrated": False}, "ranks": ranks,
              "dense": {f"model.layers.{i}.{p}": "policy: kept dense" for i in range(2)
                        for p in ("self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
              | {"lm_head": "output embedding"}}
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    out = tmp_path / "out"
    assert main(["compress", str(folder), str(out), "--policy", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers_compressed"] == 4
    assert json.loads((out / "config.json").read_text())["quantization_config"]["ranks"] == ranks
    assert main(["compress", str(folder), str(tmp_path / "x"), "--policy", str(path), "--skip", "*.q_proj"]) == 2
    assert "--skip cannot be combined with --policy" in capsys.readouterr().err
    assert main(["compress", str(folder), str(tmp_path / "y"), "--policy", str(tmp_path / "nope.json")]) == 2
    assert "nope.json' does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "whitened"], "--mode whitened needs --calibration FILE"),
        (["--calibration", "SAME"], "never calibrate on the text you evaluate on"),
        (["--prompts", "9"], "--prompts must be between 1 and 5"),
    ],
)
def test_analyze_bad_input_is_a_clear_error(extra, message, tmp_path, capsys):
    text = tmp_path / "eval.txt"
    text.write_text("some text " * 50)
    extra = [str(text) if e == "SAME" else e for e in extra]
    assert main(["analyze", "unused-model", "--text", str(text), "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert main(["analyze", "unused-model", "--text", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "none.txt does not exist" in capsys.readouterr().err


def test_compress_without_a_rank_policy_runs_the_recommended_mode(tiny_checkpoint, wide_llama, tmp_path, capsys):
    source = wide_llama
    out = tmp_path / "recommended"
    code = main(["compress", str(source), str(out), "--calibration", "model", "--calib-samples", "2",
                 "--calib-seq-len", "16", "--no-check"])
    assert code == 0
    assert "recommended mode: INT4 GPTQ (group 64) + INT8 low-rank correction, 5 bits/weight" in capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (saved["residual_bits"], saved["group_size"], saved["target_bits_per_weight"]) == (4, 64, 5.0)
    assert saved["residual_method"] == "gptq" and saved["calibration"]["source"] == "model (sampled, seed 0)"
    # the recommended mode fixes the base quantizer: asking for another one needs a rank policy
    assert main(["compress", str(tiny_checkpoint("llama")), str(tmp_path / "x"), "--residual-bits", "8"]) == 2
    assert "give a rank policy" in capsys.readouterr().err


def test_compress_heals_when_asked(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "healed"
    code = main(["compress", str(tiny_checkpoint("llama")), str(out), "--rank", "8", "--calibration", "model",
                 "--calib-samples", "4", "--calib-seq-len", "16", "--heal-steps", "3", "--no-check"])
    assert code == 0
    err = capsys.readouterr().err
    assert "healing: 3 steps on 64 tokens, KL to dense" in err
    assert (out / "model.safetensors").is_file()
    assert main(["compress", str(tiny_checkpoint("llama")), str(tmp_path / "x"), "--rank", "8", "--heal-steps", "3"]) == 2
    assert "--heal-steps needs calibration" in capsys.readouterr().err


def test_analyze_bit_choices_writes_a_mixed_bits_policy(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """``hf-svdq analyze --mode residual --bit-choices 4 8``: the option analysis through the CLI, on a tiny Llama
    (its character tokenizer patched in), ends in a policy that ``SVDQuantConfig.from_policy`` loads."""
    import transformers

    from hf_svdq import SVDQuantConfig

    from .conftest import CharTokenizer

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: CharTokenizer()))
    text, calibration = tmp_path / "eval.txt", tmp_path / "calib.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession. " * 20)
    calibration.write_text("The quick brown fox jumps over the lazy dog, and then some more words follow. " * 40)
    out = tmp_path / "options"
    code = main(["analyze", str(tiny_checkpoint("llama")), "--text", str(text), "--out", str(out), "--mode", "residual",
                 "--calibration", str(calibration), "--calib-samples", "2", "--calib-seq-len", "32", "--group-size", "32",
                 "--target-bpw", "6", "--bit-choices", "4", "8", "--eval-tokens", "128", "--prompts", "1"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bits_per_weight"] <= 6.0 + 1e-9 and summary["loops"] >= 0
    policy = json.loads((out / "policy.json").read_text())
    assert policy["setting"]["calibrated"] is True and policy["setting"]["group_size"] == 32
    with pytest.warns(UserWarning, match="analysed with calibrated"):
        config = SVDQuantConfig.from_policy(out / "policy.json")
    assert config.ranks and config.residual_bits == 4


def test_compress_a_moe_reports_its_experts_and_coverage(tmp_path, capsys):
    from .moe_models import tiny_moe

    source, out = tmp_path / "dense", tmp_path / "out"
    tiny_moe("mixtral").save_pretrained(source)
    code = main(["compress", str(source), str(out), "--rank", "4", "--residual-bits", "4", "--group-size", "32", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["coverage"]["share_of_non_embedding"] > 0.95
    assert summary["coverage"]["dense"]["router"] == 2 * 4 * 64
    assert [r["experts"] for r in summary["layers"] if r["name"].endswith("experts.gate_up_proj")] == [4, 4]
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "4x128x64" in table and "coverage:" in table and "dense, router" in table
