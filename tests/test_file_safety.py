"""File safety: what loading, compressing and pushing may read, write and upload (issue 11, cases 5-8)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_svdq import SVDQuantConfig
from hf_svdq.calibration.source import CalibrationConfig
from hf_svdq.cli import main
from hf_svdq.format.output_folder import atomic_folder, check_output_folder
from hf_svdq.publishing.hub import push_checkpoint, upload_files

DEAD_ENDPOINT = "http://127.0.0.1:9"  # any request fails: errors below must come before one


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint, tmp_path_factory):
    """A residual-mode checkpoint compressed with calibration (so its config records a calibration summary)."""
    folder = tmp_path_factory.mktemp("calibrated")
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    config = SVDQuantConfig(rank=4, residual_bits=8, group_size=32, calibration=CalibrationConfig(input_ids=ids))
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=config)
    model.save_pretrained(folder)
    return folder


def _copy_with_calibration(folder, tmp_path, calibration):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["calibration"] = calibration
    (copy / "config.json").write_text(json.dumps(config))
    return copy


# --- case 5: loading never reads calibration data -------------------------------------------------

def test_the_saved_config_records_a_summary_and_loads(calibrated):
    recorded = json.loads((calibrated / "config.json").read_text())["quantization_config"]["calibration"]
    assert recorded["source"] == "input_ids" and len(recorded["sha256"]) == 64
    model = AutoModelForCausalLM.from_pretrained(calibrated)
    assert model.config.quantization_config.calibration.recorded == recorded


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
@pytest.mark.parametrize("kind", ["fifo", "file", "text", "dataset"])
def test_a_config_naming_calibration_data_is_refused_without_reading_it(calibrated, tmp_path, kind):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for reading would hang the loader
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours to read")
    live = {"fifo": {"file": str(fifo)}, "file": {"file": str(secret)}, "text": {"text": "hello"},
            "dataset": {"dataset": "austen"}}[kind]
    copy = _copy_with_calibration(calibrated, tmp_path, live)
    with pytest.raises(ValueError, match=r"quantization_config\.calibration must be the recorded summary"):
        AutoModelForCausalLM.from_pretrained(copy)


# --- case 6: push validates like the loader and uploads only model-folder files ------------------

def test_push_refuses_what_from_pretrained_would_refuse_before_any_request(calibrated, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(calibrated, newer)
    config = json.loads((newer / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (newer / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version 99 is newer"):
        AutoModelForCausalLM.from_pretrained(newer)
    with pytest.raises(ValueError, match="format_version 99 is newer"):
        push_checkpoint(newer, "user/x", token="hf_test", endpoint=DEAD_ENDPOINT)
    live = _copy_with_calibration(calibrated, tmp_path / "live", {"file": "/etc/hostname"})
    with pytest.raises(ValueError, match="recorded summary"):
        push_checkpoint(live, "user/x", token="hf_test", endpoint=DEAD_ENDPOINT)


def test_push_uploads_an_allow_list_and_refuses_symlinks(calibrated, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(calibrated, folder)
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("[core]")
    (folder / ".env").write_text("HF_TOKEN=secret")
    (folder / "notes.py").write_text("print('code')")
    (folder / "tokenizer.json").write_text("{}")
    with pytest.warns(UserWarning, match=r"not uploading \['notes.py'\]"):
        files = upload_files(folder)
    assert set(files) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}
    (folder / "link.json").symlink_to(tmp_path.parent)
    with pytest.raises(ValueError, match="link.json is a symlink"):
        push_checkpoint(folder, "user/x", token="hf_test", endpoint=DEAD_ENDPOINT)


# --- case 7: compress never touches its source and writes atomically ------------------------------

def test_compress_refuses_its_source_or_a_folder_inside_it(tiny_checkpoint, tmp_path, capsys):
    source = tmp_path / "src"
    shutil.copytree(tiny_checkpoint("llama"), source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    for out in (source, source / "compressed"):
        assert main(["compress", str(source), str(out), "--rank", "8", "--no-check"]) == 2
        assert "overlaps the source" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


def test_compress_refuses_a_non_empty_output_unless_overwrite(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["compress", str(tiny_checkpoint("llama")), str(out), "--rank", "8", "--no-check"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["compress", str(tiny_checkpoint("llama")), str(out), "--rank", "8", "--no-check", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and ((out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left beside it


def test_an_interrupted_write_leaves_no_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), atomic_folder(out) as folder:
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not a folder"):
        (tmp_path / "file").write_text("x")
        check_output_folder(tmp_path / "file")


# --- case 8: stale or unsafe weight files -----------------------------------------------------------

def test_a_stale_single_file_beside_a_sharded_save_is_an_error(tiny_checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=SVDQuantConfig(rank=8))
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    AutoModelForCausalLM.from_pretrained(folder)  # the sharded save alone loads
    stale = tmp_path / "single"
    AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=SVDQuantConfig(rank=4)).save_pretrained(stale)
    shutil.copy(stale / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(ValueError, match="holds both model.safetensors and model.safetensors.index.json"):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="holds both"):
        push_checkpoint(folder, "user/x", token="hf_test", endpoint=DEAD_ENDPOINT)


def test_a_pickled_checkpoint_is_refused_naming_the_file(tiny_checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=SVDQuantConfig(rank=8))
    folder = tmp_path / "bin"
    model.save_pretrained(folder)
    state = {k: v for k, v in model.state_dict().items() if "q_proj" not in k}  # factors of q_proj missing
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: an hf_svdq checkpoint must be safetensors"):
        AutoModelForCausalLM.from_pretrained(folder)
