import pytest
import torch

from hf_svdq import SVDQuantConfig
from hf_svdq.calibration.source import CalibrationConfig


class _Tokenizer:
    """Whitespace tokenizer with a `__call__` like a transformers tokenizer."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = [hash(w) % 1000 for w in text.split()]

        class Out:
            input_ids = torch.tensor([ids])

        return Out()


def test_windows_are_evenly_spaced_and_sized():
    text = " ".join(f"w{i}" for i in range(1000))
    ids = CalibrationConfig(text=text, n_samples=4, seq_len=16).token_ids(_Tokenizer())
    assert ids.shape == (4, 16)
    assert len({tuple(row.tolist()) for row in ids}) == 4


def test_too_short_text_names_the_numbers():
    calibration = CalibrationConfig(text="only a few words here", n_samples=8, seq_len=32)
    with pytest.raises(ValueError, match=r"has 5 tokens but n_samples \* seq_len = 8 \* 32 = 256"):
        calibration.token_ids(_Tokenizer())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": "   "}, "calibration.text must be a non-empty string"),
        ({"texts": ["", " "]}, "calibration.texts is empty"),
        ({}, "give one of"),
        ({"text": "a", "file": "b"}, "give one source"),
        ({"text": "a", "n_samples": 0}, "n_samples must be a positive int, got 0"),
        ({"file": "/nonexistent/calib.txt"}, "does not exist"),
    ],
)
def test_bad_calibration_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CalibrationConfig(**kwargs)


def test_saved_summary_holds_no_data_and_round_trips():
    config = SVDQuantConfig(rank=8, calibration={"text": "some words " * 100, "n_samples": 2, "seq_len": 8})
    summary = config.to_dict()["calibration"]
    assert summary["source"] == "text" and len(summary["sha256"]) == 64 and "some words" not in str(summary)
    again = SVDQuantConfig.from_dict(config.to_dict())
    assert not again.calibration.has_data
    with pytest.raises(ValueError, match="not available"):
        again.calibration.token_ids(_Tokenizer())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 8, "energy": 0.9}, "one rank policy"),
        ({"energy": 1.5}, r"energy must be a number in \(0, 1\], got 1.5"),
        ({"target_param_ratio": 1.2}, "target_param_ratio must be in"),
        ({"target_bits_per_weight": -1}, "target_bits_per_weight must be a positive finite number, got -1"),
        ({"rank": 8, "residual_bits": 3}, "residual_bits must be one of"),
        ({"rank": 0}, "rank must be a positive int, got 0"),
        ({"rank": 8, "residual_bits": 4, "residual_method": "gptq"}, "needs calibration"),
        ({"rank": 8, "residual_bits": 4, "group_size": 0}, "group_size must be a positive int"),
        ({"target_param_ratio": 0.8, "residual_bits": 4}, "use target_bits_per_weight"),
        ({"rank": 8, "calibration": {"txt": "x"}}, r"unknown key\(s\) \['txt'\]"),
    ],
)
def test_bad_policy_and_mode_combinations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SVDQuantConfig(**kwargs)


def test_rank_zero_is_plain_quantization_in_residual_mode():
    config = SVDQuantConfig(rank=0, residual_bits=8, group_size=None)
    assert config.residual_method == "rtn" and config.compresses_after_load


def test_calibration_accepts_what_transformers_users_pass(tmp_path):
    """Issue 10: a list of strings (as GPTQConfig(dataset=[...])), a path, a dataset name."""
    from hf_svdq.calibration.source import BUNDLED_TEXT

    texts = SVDQuantConfig(rank=8, calibration=["first text", "second text"]).calibration
    assert texts.texts == ["first text", "second text"] and texts.raw_text() == "first text\n\nsecond text"
    path = tmp_path / "calib.txt"
    path.write_text("words " * 50)
    assert SVDQuantConfig(rank=8, calibration=str(path)).calibration.file == str(path)
    assert SVDQuantConfig(rank=8, calibration=path).calibration.file == str(path)  # os.PathLike
    default = SVDQuantConfig(rank=8, calibration="default").calibration
    assert default.dataset == "austen" and default.raw_text() == BUNDLED_TEXT.read_text(encoding="utf-8")
    assert default.summary()["source"] == "dataset:austen"
    assert SVDQuantConfig(rank=8, calibration="model").calibration.dataset == "model"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("the capital of France is Paris", "neither a dataset name .* nor an existing text file; pass raw text as a list"),
        ("/nonexistent/file.txt", "neither a dataset name"),
        ([], "a list must hold the calibration texts"),
        (["ok", 3], "a list must hold the calibration texts"),
        (42, "got int"),
        ({"dataset": "c4"}, r"calibration.dataset must be 'default' or one of \('austen', 'model'\), got 'c4'"),
        ({"dataset": "austen", "seed": -1}, "calibration.seed must be a non-negative int"),
        ({"texts": "not a list"}, "calibration.texts must be a list of strings"),
    ],
)
def test_bad_calibration_values_are_named(value, message):
    with pytest.raises(ValueError, match=message):
        SVDQuantConfig(rank=8, calibration=value)


def test_bundled_text_is_long_enough_for_the_default_windows():
    from hf_svdq.calibration.source import BUNDLED_TEXT, HELDOUT_TEXT

    # ~21.9k SmolLM2 tokens (README of hf_svdq/data); 64 x 256 = 16k are the default windows
    assert len(BUNDLED_TEXT.read_text(encoding="utf-8").split()) > 16_000 // 1.4  # ~1.4 tokens per word of Austen
    assert not set(HELDOUT_TEXT.read_text(encoding="utf-8").splitlines()[:50]) & set(
        BUNDLED_TEXT.read_text(encoding="utf-8").splitlines()) - {""}


def test_model_sampled_calibration_is_seeded_and_leaves_the_global_rng_alone(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama")).eval()
    state = torch.random.get_rng_state()
    calibration = CalibrationConfig(dataset="model", n_samples=3, seq_len=10, batch_size=2)
    first = calibration.token_ids(None, model)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first.shape == (3, 10) and first.dtype == torch.long
    assert torch.equal(first, CalibrationConfig(dataset="model", n_samples=3, seq_len=10, batch_size=2).token_ids(None, model))
    assert not torch.equal(first, CalibrationConfig(dataset="model", n_samples=3, seq_len=10, seed=1).token_ids(None, model))
    assert calibration.summary()["sha256"] is not None and calibration.summary()["source"] == "model (sampled, seed 0)"
    with pytest.raises(ValueError, match="pass model="):
        CalibrationConfig(dataset="model").token_ids(None)


def test_compressing_with_model_sampled_calibration_records_its_digest(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    config = SVDQuantConfig(rank=4, residual_bits=8, group_size=32,
                            calibration={"dataset": "model", "n_samples": 2, "seq_len": 16})
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=config)
    model.save_pretrained(tmp_path)
    import json

    summary = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["calibration"]
    assert summary["source"] == "model (sampled, seed 0)" and len(summary["sha256"]) == 64
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not again.config.quantization_config.calibration.has_data
