import pytest
import torch

from hf_svdq import SVDQuantConfig
from hf_svdq.calibration import CalibrationConfig


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
        ({"text": "   "}, "calibration.text is empty"),
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
        ({"target_bits_per_weight": -1}, "target_bits_per_weight must be a positive number, got -1"),
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
