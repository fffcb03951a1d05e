"""Streaming compression (disk to disk, a block at a time): same model as in memory, memory bounded by
one block, resumable to the same bytes, refused clearly where it cannot work."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_svdq import CalibrationConfig, SVDQuantConfig
from hf_svdq.streaming import StreamingUnsupported, compress_checkpoint, work_folder
from hf_svdq.streaming.estimate import MemoryEstimate, check_fits
from tests.conftest import tiny_model

ARCHS = ["llama", "qwen2", "gemma3", "gpt_neo", "gpt2"]


def _calibration(n: int = 4, length: int = 16) -> CalibrationConfig:
    ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(3))
    return CalibrationConfig(input_ids=ids.tolist(), batch_size=2)


def _configs() -> dict[str, SVDQuantConfig]:
    return {
        "recommended-like": SVDQuantConfig(target_bits_per_weight=8.0, residual_bits=4, group_size=16, refine_steps=1,
                                           calibration=_calibration()),
        "calibrated rank": SVDQuantConfig(rank=8, calibration=_calibration()),
        "data-free budget": SVDQuantConfig(target_bits_per_weight=8.0, residual_bits=4, group_size=16),
        "data-free residual": SVDQuantConfig(rank=4, residual_bits=8, group_size=16),
        "mixed bits": SVDQuantConfig(target_bits_per_weight=8.0, residual_bits=4, group_size=16, bit_choices=[4, 8]),
        "sequential": SVDQuantConfig(rank=8, residual_bits=4, group_size=16,
                                     calibration=CalibrationConfig(input_ids=_calibration().input_ids, sequential=True,
                                                                   batch_size=2)),
    }


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_checkpoint_is_the_in_memory_compression(arch, tiny_checkpoint, input_ids, tmp_path):
    source = tiny_checkpoint(arch)
    config = _configs()["recommended-like"]
    compress_checkpoint(source, tmp_path / "out", config, progress=False)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    in_memory = AutoModelForCausalLM.from_pretrained(source, quantization_config=config)
    assert torch.equal(_logits(streamed, input_ids), _logits(in_memory, input_ids))
    assert streamed.config.quantization_config.ranks == in_memory.config.quantization_config.ranks
    assert not work_folder(tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["calibrated rank", "data-free budget", "data-free residual", "mixed bits", "sequential"])
def test_every_mode_streams(mode, tiny_checkpoint, input_ids, tmp_path):
    source = tiny_checkpoint("llama", tie=False)
    config = _configs()[mode]
    compress_checkpoint(source, tmp_path / "out", config, progress=False)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    in_memory = AutoModelForCausalLM.from_pretrained(source, quantization_config=config)
    assert torch.allclose(_logits(streamed, input_ids), _logits(in_memory, input_ids), atol=1e-5)
    # an untied head is written once, dense
    assert "lm_head.weight" in streamed.state_dict()


def test_an_interrupted_run_resumes_to_the_same_bytes(tiny_checkpoint, tmp_path, monkeypatch):
    from hf_svdq.streaming import run

    source = tiny_checkpoint("llama")
    config = _configs()["recommended-like"]
    compress_checkpoint(source, tmp_path / "whole", config, progress=False)
    real_save = run.save_block
    calls = {"n": 0}

    def dies_on_the_second_block(block, prefix, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real_save(block, prefix, path)

    monkeypatch.setattr(run, "save_block", dies_on_the_second_block)
    with pytest.raises(KeyboardInterrupt):
        compress_checkpoint(source, tmp_path / "resumed", config, progress=False)
    assert not (tmp_path / "resumed").exists()
    assert (work_folder(tmp_path / "resumed") / "block-00000.safetensors").is_file()
    monkeypatch.setattr(run, "save_block", real_save)
    compress_checkpoint(source, tmp_path / "resumed", config, progress=False, resume=True)
    assert calls["n"] == 2  # the first block was not compressed again
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")


_KILLED_RUN = """
import sys, torch
from hf_svdq import CalibrationConfig, SVDQuantConfig
from hf_svdq.streaming import compress_checkpoint
ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3)).tolist()
config = SVDQuantConfig(target_bits_per_weight=8.0, residual_bits=4, group_size=16, refine_steps=1,
                        calibration=CalibrationConfig(input_ids=ids, batch_size=2))
compress_checkpoint(sys.argv[1], sys.argv[2], config, progress=False, resume=sys.argv[3] == "resume")
"""


def test_a_killed_process_resumes_to_the_same_bytes(tmp_path):
    """SIGKILL (as an OOM kill) after the first blocks are written; --resume finishes it identically."""
    source = tmp_path / "src"
    import transformers as tf

    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=512, num_hidden_layers=12,
                                       num_attention_heads=4, num_key_value_heads=2)).save_pretrained(source)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-c", _KILLED_RUN, str(source)]
    subprocess.run([*run, str(tmp_path / "whole"), "fresh"], check=True, env=env)
    process = subprocess.Popen([*run, str(tmp_path / "out"), "fresh"], env=env)
    work = work_folder(tmp_path / "out")
    deadline = time.monotonic() + 120
    while not (work / "block-00002.json").is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if process.poll() is not None:
        pytest.fail("the run finished before it could be killed; make the model bigger")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "out").exists()
    subprocess.run([*run, str(tmp_path / "out"), "resume"], check=True, env=env)
    assert _files(tmp_path / "out") == _files(tmp_path / "whole")


def test_resume_refuses_other_inputs_by_name(tiny_checkpoint, tmp_path, monkeypatch):
    from hf_svdq.streaming import run

    source = tiny_checkpoint("llama")
    monkeypatch.setattr(run, "save_block", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        compress_checkpoint(source, tmp_path / "out", _configs()["calibrated rank"], progress=False)
    with pytest.raises(ValueError, match="quantization_config differ"):
        compress_checkpoint(source, tmp_path / "out", SVDQuantConfig(rank=4, calibration=_calibration()),
                            progress=False, resume=True)


def _live_gram_bytes() -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on every object touches deprecated torch attributes
        tensors = []
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    tensors.append(obj)
            except ReferenceError:  # a dead weak proxy left by another test
                continue
    return sum(t.numel() * t.element_size() for t in tensors
               if t.dtype == torch.float64 and t.dim() == 2 and t.shape[0] == t.shape[1] and t.shape[0] >= 64)


@pytest.mark.parametrize("blocks", [2, 6])
def test_live_gram_bytes_are_bounded_by_one_block(blocks, tmp_path, monkeypatch):
    """The Grams alive while any layer is compressed never exceed one block's (one per shared input):
    the same bound with 2 blocks as with 6."""
    import transformers as tf

    from hf_svdq.compression import blockwise

    source = tmp_path / "src"
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=blocks,
                                       num_attention_heads=4, num_key_value_heads=2)).save_pretrained(source)
    seen: list[int] = []
    real = blockwise.compress_layer
    before = _live_gram_bytes()  # what earlier tests left alive

    def watched(*args, **kwargs):
        seen.append(_live_gram_bytes() - before)  # the group's whitening factor is float32: not counted
        return real(*args, **kwargs)

    monkeypatch.setattr(blockwise, "compress_layer", watched)
    compress_checkpoint(source, tmp_path / "out", _configs()["recommended-like"], progress=False)
    one_block = (64 * 64 * 3 + 128 * 128) * 8  # inputs of q/k/v, o, gate/up and down
    assert 0 < max(seen) <= one_block


def test_the_memory_check_names_what_does_not_fit():
    estimate = MemoryEstimate({"one dense block": 3 * 1024**3, "one block's input Grams": 2 * 1024**3, "runtime": 10})
    with pytest.raises(MemoryError, match=r"needs about 5\.0 GB and 1\.0 GB are available.*one dense block: 3\.00 GB"):
        check_fits(estimate, available=1024**3)
    check_fits(estimate, available=6 * 1024**3)


def test_what_cannot_stream_is_refused_by_name(tiny_checkpoint, tmp_path):
    mixed = SVDQuantConfig(target_bits_per_weight=8.0, residual_bits=4, group_size=16, bit_choices=[4, 8],
                           calibration=_calibration())
    with pytest.raises(StreamingUnsupported, match="backward pass"):
        compress_checkpoint(tiny_checkpoint("llama"), tmp_path / "out", mixed, progress=False)
    from tests.moe_models import tiny_moe

    tiny_moe("qwen3_moe").save_pretrained(tmp_path / "moe")
    with pytest.raises(StreamingUnsupported, match="mixture-of-experts"):
        compress_checkpoint(tmp_path / "moe", tmp_path / "out", SVDQuantConfig(rank=4), progress=False)


def test_a_checkpoint_missing_a_block_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    source = tmp_path / "src"
    tiny_model("llama").save_pretrained(source)
    state = load_file(str(source / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        compress_checkpoint(source, tmp_path / "out", SVDQuantConfig(rank=4), progress=False)


_HEAP_CHILD = r"""
import sys, torch
from pathlib import Path
from hf_svdq import SVDQuantConfig
from hf_svdq.compression import memory
from hf_svdq.streaming import compress_checkpoint

def anon():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssAnon"))
    return int(line.split()[1]) * 1024

if sys.argv[3] == "compress":
    compress_checkpoint(sys.argv[1], sys.argv[2], SVDQuantConfig(rank=4), progress=False)
    assert memory.bound_heap()
big = torch.empty(30 << 20, dtype=torch.uint8).fill_(1)  # mapped, then freed: raises glibc's default threshold
del big
before = anon()
temporary = torch.empty(20 << 20, dtype=torch.uint8).fill_(1)
pin = torch.ones(1000, dtype=torch.uint8)  # allocated after it: the temporary is not the heap's top
grown = anon() - before
del temporary
print(grown, anon() - before, int(pin.sum()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("compress", [True, False])
def test_a_compression_keeps_large_temporaries_off_the_heap(compress, tiny_checkpoint, tmp_path):
    """After a compression, a freed 20 MB temporary goes back to the OS; without one (glibc's default, its
    threshold raised past 20 MB by a freed 30 MB block) it stays on the heap. In a fresh process: a long-lived
    one may serve the temporary from a free chunk of its heap either way."""
    source = tiny_checkpoint("llama", tie=False)
    run = subprocess.run([sys.executable, "-c", _HEAP_CHILD, str(source), str(tmp_path / "out"),
                          "compress" if compress else "none"], capture_output=True, text=True, check=True)
    grown, kept, pinned = (int(v) for v in run.stdout.split()[-3:])
    assert grown > 15 << 20 and pinned == 1000
    assert (kept < 4 << 20) if compress else (kept > 15 << 20)
