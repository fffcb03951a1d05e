"""A fresh interpreter where hf_svdq is installed but never imported, and one where it is switched off."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_svdq import SVDQuantConfig


@pytest.fixture(scope="module")
def saved(tiny_checkpoint, tmp_path_factory, input_ids):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("autoload")
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), quantization_config=SVDQuantConfig(rank=8))
    model.save_pretrained(folder)
    with torch.no_grad():
        torch.save(model(input_ids).logits, folder / "expected.pt")
    torch.save(input_ids, folder / "ids.pt")
    return folder


def _run(code: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HF_SVDQ_NO_AUTOLOAD"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300, check=False)


LOAD = """
    import sys, torch
    from transformers import AutoModelForCausalLM
    folder = sys.argv[1] if len(sys.argv) > 1 else {folder!r}
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        same = torch.equal(model(torch.load(folder + "/ids.pt")).logits, torch.load(folder + "/expected.pt"))
    print("TYPE", type(model.model.layers[0].self_attn.q_proj).__name__, "SAME", same)
"""


def test_plain_transformers_loads_without_importing_hf_svdq(saved):
    code = "import sys\nassert 'hf_svdq.integration.config' not in sys.modules\n" + textwrap.dedent(LOAD.format(folder=str(saved)))
    result = _run(code, {})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TYPE SVDQLinear SAME True" in result.stdout


def test_interpreter_start_does_not_import_torch():
    result = _run("import sys; print('torch' in sys.modules, 'transformers' in sys.modules)", {})
    assert result.stdout.split() == ["False", "False"]


def test_without_hf_svdq_loading_fails_loudly(saved):
    """HF_SVDQ_NO_AUTOLOAD=1 makes transformers see what an install without hf_svdq sees."""
    result = _run(LOAD.format(folder=str(saved)), {"HF_SVDQ_NO_AUTOLOAD": "1"})
    assert result.returncode != 0
    assert "Unknown quantization type, got svdq" in result.stderr
    assert "size mismatch" in result.stderr or "mismatched" in result.stderr.lower()
    assert "TYPE" not in result.stdout  # no model was handed back


@pytest.mark.parametrize("module", ["hf_svdq.integration.quantizer", "hf_svdq.integration.config", "hf_svdq.cli"])
@pytest.mark.parametrize("autoload", ["", "1"])
def test_any_import_order_registers_without_warnings(module, autoload):
    code = f"""
        import warnings
        warnings.simplefilter("error")
        import {module}
        from hf_svdq import SVDQuantConfig
        SVDQuantConfig(rank=4)
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        print(AUTO_QUANTIZER_MAPPING["svdq"].__name__)
    """
    result = _run(code, {"HF_SVDQ_NO_AUTOLOAD": autoload})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "SVDQuantizer"


def test_the_hook_imports_nothing_the_interpreter_did_not_already_load():
    """The hook runs in every Python process of the environment: it may add only hf_svdq's own two tiny
    modules (measured in benchmarks/startup.py: well under 5 ms), never typing, importlib.abc, torch or
    transformers."""
    code = "import sys; print(' '.join(sorted(sys.modules)))"
    with_hook = set(_run(code, {}).stdout.split())
    opted_out = set(_run(code, {"HF_SVDQ_NO_AUTOLOAD": "1"}).stdout.split())
    assert with_hook - opted_out == {"hf_svdq", "hf_svdq._autoload"}
