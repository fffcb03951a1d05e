"""Fuzzing the loader (issue 11): random mutations of a valid small checkpoint (safetensors header JSON,
dtypes, shapes, offsets, config fields, truncated files) either load the right model (same logits) or
raise a clear error; never a crash, a hang over 5 s, a silently different model or an allocation far
beyond the declared tensors. The default run tries 30 mutations; ``-m slow`` runs 200."""

from __future__ import annotations

import json
import random
import resource
import shutil
import signal
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM

from hf_svdq import SVDQuantConfig

CLEAR_ERRORS = (ValueError, OSError, SafetensorError)
ODD_VALUES = [None, -1, 0, 1.5, float("nan"), "x", "", [], {}, True, 10**12, {"a": 1}, [4, "8"]]
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"]


@pytest.fixture(scope="module")
def valid(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("valid")
    config = SVDQuantConfig(rank={"*.self_attn.*": 8, "*.mlp.*": 0}, residual_bits=4, group_size=32)
    AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=config).save_pretrained(folder)
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(folder)(ids).logits
    return folder, ids, logits


def _read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _write_header(path: Path, header: dict | bytes, body: bytes) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def mutate(folder: Path, rng: random.Random) -> str:
    """Apply one random mutation to the checkpoint in ``folder``; returns what it did."""
    weights, config_path = folder / "model.safetensors", folder / "config.json"
    kind = rng.choice(["dtype", "shape", "offsets", "drop", "rename", "header_bytes", "header_length", "truncate",
                       "qconfig", "qconfig_drop", "config_text"])
    if kind in ("dtype", "shape", "offsets", "drop", "rename"):
        header, body = _read_header(weights)
        name = rng.choice(sorted(k for k in header if k != "__metadata__"))
        entry = header[name]
        if kind == "dtype":
            entry["dtype"] = rng.choice(DTYPES)
        elif kind == "shape":
            shape = entry["shape"]
            choice = rng.choice(["double", "zero", "extra", "huge", "drop"])
            if choice == "double" and shape:
                shape[rng.randrange(len(shape))] *= 2
            elif choice == "zero" and shape:
                shape[rng.randrange(len(shape))] = 0
            elif choice == "extra":
                shape.append(1)
            elif choice == "huge":
                entry["shape"] = [10**12] + shape[1:]
            elif shape:
                shape.pop()
        elif kind == "offsets":
            begin, end = entry["data_offsets"]
            entry["data_offsets"] = rng.choice([[begin, end + 8], [begin + 8, end], [end, begin], [0, 10**15], [begin, begin]])
        elif kind == "drop":
            del header[name]
        else:
            header[name + ".x"] = header.pop(name)
        _write_header(weights, header, body)
        return f"{kind} {name}"
    if kind == "header_bytes":
        header, body = _read_header(weights)
        text = bytearray(json.dumps(header).encode())
        for _ in range(rng.randint(1, 4)):
            text[rng.randrange(len(text))] = rng.randrange(32, 127)
        _write_header(weights, bytes(text), body)
        return kind
    if kind == "header_length":
        raw = bytearray(weights.read_bytes())
        (length,) = struct.unpack("<Q", raw[:8])
        raw[:8] = struct.pack("<Q", rng.choice([0, length - 1, length + 1, 2**40]))
        weights.write_bytes(bytes(raw))
        return kind
    if kind == "truncate":
        raw = weights.read_bytes()
        weights.write_bytes(raw[: rng.randrange(len(raw))])
        return kind
    config = json.loads(config_path.read_text())
    qconfig = config["quantization_config"]
    if kind == "qconfig":
        # not quant_method: transformers' dispatch key, read before hf_svdq runs (another value is not our checkpoint)
        key = rng.choice([*sorted(k for k in qconfig if k != "quant_method"), "unknown_field"])
        qconfig[key] = rng.choice(ODD_VALUES)
        config_path.write_text(json.dumps(config))
        return f"qconfig {key}={qconfig[key]!r}"
    if kind == "qconfig_drop":
        key = rng.choice(sorted(k for k in qconfig if k != "quant_method"))
        del qconfig[key]
        config_path.write_text(json.dumps(config))
        return f"qconfig drop {key}"
    text = config_path.read_text()
    config_path.write_text(text[: rng.randrange(len(text))])
    return "config truncated"


class _Hang(Exception):
    pass


def _alarm(_signum, _frame):
    raise _Hang


def _load_outcome(folder: Path, ids: torch.Tensor, expected: torch.Tensor) -> str:
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(5)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(folder)
            with torch.no_grad():
                logits = model(ids).logits
    except _Hang:
        return "hang"
    except CLEAR_ERRORS as err:
        return "error" if str(err).strip() else f"empty message {type(err).__name__}"
    except Exception as err:  # noqa: BLE001 (the point: any other exception is a finding)
        return f"unclear {type(err).__name__}: {str(err)[:300]}"
    finally:
        signal.alarm(0)
    return "same" if torch.equal(logits, expected) else "silently different"


def _fuzz(valid, tmp_path, count: int, seed: int) -> None:
    folder, ids, expected = valid
    rng = random.Random(seed)
    findings = []
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(count):
        work = tmp_path / f"m{i}"
        shutil.copytree(folder, work)
        what = mutate(work, rng)
        outcome = _load_outcome(work, ids, expected)
        if outcome not in ("same", "error"):
            findings.append(f"{what}: {outcome}")
        shutil.rmtree(work)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert not findings, "\n".join(findings)
    # the checkpoint is ~60 KB; a loader trusting a declared 10^12-element shape would allocate terabytes
    assert grown_mib < 512, f"peak RSS grew {grown_mib:.0f} MiB while loading mutated checkpoints"


def test_fuzz_loader_short(valid, tmp_path):
    _fuzz(valid, tmp_path, 30, seed=0)


@pytest.fixture(scope="module")
def valid_moe(tmp_path_factory):
    """A tiny Qwen3-MoE with every expert stack compressed (INT4 g32 + rank 8), saved."""
    from .moe_models import tiny_moe

    source, folder = tmp_path_factory.mktemp("moe-dense"), tmp_path_factory.mktemp("valid-moe")
    tiny_moe("qwen3_moe").save_pretrained(source)
    config = SVDQuantConfig(rank=8, residual_bits=4, group_size=32)
    AutoModelForCausalLM.from_pretrained(source, quantization_config=config).save_pretrained(folder)
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(folder)(ids).logits
    return folder, ids, logits


def test_fuzz_loader_with_expert_stacks(valid_moe, tmp_path):
    _fuzz(valid_moe, tmp_path, 30, seed=2)


@pytest.mark.slow
def test_fuzz_loader_200(valid, tmp_path):
    _fuzz(valid, tmp_path, 200, seed=1)
