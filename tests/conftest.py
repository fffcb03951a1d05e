"""Shared fixtures: tiny random checkpoints per architecture, and the real SmolLM2 checkpoint."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TEXT_DIR = Path(os.environ.get("HF_SVDQ_TEXT_DIR", REPO_ROOT.parent / "shared" / "data" / "text"))

ARCHITECTURES = ("llama", "gpt_neo", "gpt2", "gemma3", "qwen2")


def tiny_model(arch: str, tie: bool = True) -> torch.nn.Module:
    """A small random causal LM of ``arch`` (deterministic weights)."""
    import transformers as tf

    torch.manual_seed(0)
    common = {"vocab_size": 128, "tie_word_embeddings": tie}
    if arch == "llama":
        config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, **common)
        return tf.LlamaForCausalLM(config)
    if arch == "qwen2":
        config = tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, **common)
        return tf.Qwen2ForCausalLM(config)
    if arch == "gemma3":
        config = tf.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, sliding_window=16, **common)
        return tf.Gemma3ForCausalLM(config)
    if arch == "gpt_neo":
        config = tf.GPTNeoConfig(hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                                 window_size=16, max_position_embeddings=128, **common)
        return tf.GPTNeoForCausalLM(config)
    if arch == "gpt2":
        config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)
        return tf.GPT2LMHeadModel(config)
    raise ValueError(arch)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_checkpoint(arch, tie=True)`` -> folder of a saved dense tiny model (built once per session)."""
    cache: dict[tuple[str, bool], Path] = {}

    def make(arch: str, tie: bool = True) -> Path:
        key = (arch, tie)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{arch}-{'tied' if tie else 'untied'}")
            tiny_model(arch, tie).save_pretrained(folder)
            cache[key] = folder
        return cache[key]

    return make


@pytest.fixture(scope="session")
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real model as a plain checkpoint (converted once into the hf_svdq cache)."""
    from hf_svdq.real_model import smollm2_checkpoint, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(f"real model unavailable: {err}")
    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def text_dir() -> Path:
    if not TEXT_DIR.is_dir():
        pytest.skip(f"evaluation text folder {TEXT_DIR} is absent")
    return TEXT_DIR


class CharTokenizer:
    """A character tokenizer for the tiny models (vocab 128), enough for evaluation and generation."""

    chat_template = None

    class _Encoding(dict):
        @property
        def input_ids(self) -> torch.Tensor:
            return self["input_ids"]

    def __call__(self, text: str, return_tensors: str | None = None, add_special_tokens: bool = True) -> dict:
        return self._Encoding(input_ids=torch.tensor([[ord(c) % 128 for c in text]]))

    def decode(self, ids: torch.Tensor, skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + int(i) % 95) for i in ids)


def fragile_llama() -> torch.nn.Module:
    """Tiny Llama whose Linear weights are exactly rank 4, except ``model.layers.1.self_attn.v_proj``:
    full rank and large, so compressing it at a low rank is the one thing that hurts (a known pillar)."""
    model = tiny_model("llama").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0, generator=generator)
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                out_f, in_f = module.weight.shape
                low = torch.randn(out_f, 4, generator=generator) @ torch.randn(4, in_f, generator=generator)
                module.weight.copy_(low / in_f**0.5)
        fragile = model.model.layers[1].self_attn.v_proj.weight
        fragile.copy_(torch.randn(fragile.shape, generator=generator) * 3 / fragile.shape[1] ** 0.5)
    return model


@pytest.fixture
def numba_kernels(monkeypatch: pytest.MonkeyPatch):
    """Our decode on the numba kernels (float activations) for one test, then the default choice again: for
    tests that compare our logits with another reader's, or a prefill's with our decode (the compiled kernels
    round activations to int8, which is not what those compare). Restored even when the test fails or skips."""
    from hf_svdq.kernels import backend

    monkeypatch.setenv(backend.BACKEND_ENV, "numba")
    backend.reset()
    yield
    backend.reset()


@pytest.fixture
def hub_server(tmp_path: Path):
    """A started local server speaking the Hub's HTTP protocol (``tests/hub_server.py``), stopped after the test."""
    from .hub_server import HubServer

    with HubServer(tmp_path / "hub") as server:
        yield server


@pytest.fixture(scope="session")
def smollm2_int4_r24(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 compressed once per session as INT4 group 64 + rank-24 correction (data-free, ~20 s), saved."""
    from transformers import AutoModelForCausalLM

    from hf_svdq import SVDQuantConfig

    folder = tmp_path_factory.mktemp("smollm2-int4-r24")
    config = SVDQuantConfig(rank=24, residual_bits=4, group_size=64)
    AutoModelForCausalLM.from_pretrained(smollm2_path, quantization_config=config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def wide_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-block random Llama 256 wide (at 64 wide, a rank floor alone exceeds a 5-bit budget)."""
    import transformers as tf

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wide-llama")
    config = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=128)
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def qwen2_gguf_export(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-block random Qwen2 (128 wide, q/k/v biases) with SmolLM2's 49152-token vocabulary, compressed as
    INT4 g32 + rank 8 and exported to GGUF with SmolLM2's tokenizer: (compressed checkpoint, GGUF folder)."""
    import transformers as tf


    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("qwen2-gguf")
    config = tf.Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512)
    return _compress_and_export(tf.Qwen2ForCausalLM(config), root, smollm2_path)


def _compress_and_export(model: torch.nn.Module, root: Path, tokenizer: Path) -> tuple[Path, Path]:
    """``model`` with weights drawn larger than the default init (so every layer matters to the logits), saved,
    compressed as INT4 g32 + rank 8 and exported to GGUF: (compressed checkpoint, GGUF folder)."""
    import transformers as tf

    from hf_svdq import SVDQuantConfig
    from hf_svdq.publishing.gguf_export import export_gguf

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.08)
            elif name.endswith("bias"):
                param.normal_(0, 0.3)
    model.save_pretrained(root / "dense")
    compressed = tf.AutoModelForCausalLM.from_pretrained(
        root / "dense", quantization_config=SVDQuantConfig(rank=8, residual_bits=4, group_size=32))
    compressed.save_pretrained(root / "compressed")
    export_gguf(root / "compressed", root / "gguf", tokenizer=tokenizer, progress=False)
    return root / "compressed", root / "gguf"


@pytest.fixture(scope="session")
def moe_gguf_exports(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Random 2-block Mixtral and Qwen3-MoE (128 wide, 4 experts of width 64, top-2) with SmolLM2's vocabulary,
    compressed as INT4 g32 + rank 8 (attention and every expert stack) and exported to GGUF with SmolLM2's
    tokenizer: ``{arch: (compressed checkpoint, GGUF folder)}``."""
    import transformers as tf

    from .moe_models import moe_config

    out = {}
    for arch in ("mixtral", "qwen3_moe"):
        config = moe_config(arch)
        config.vocab_size, config.hidden_size, config.max_position_embeddings = 49152, 128, 512
        if arch == "qwen3_moe":
            config.norm_topk_prob, config.head_dim = True, 32
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config)
        out[arch] = _compress_and_export(model, tmp_path_factory.mktemp(f"{arch}-gguf"), smollm2_path)
    return out


@pytest.fixture(scope="session")
def smollm2_moe_path(smollm2_path: Path) -> Path:
    """The upcycled SmolLM2 mixture of experts (8 experts, top-2; :mod:`hf_svdq.real_moe`), built once and cached."""
    from hf_svdq.real_moe import smollm2_moe_checkpoint

    return smollm2_moe_checkpoint()


@pytest.fixture(scope="session")
def smollm2_moe_int4_r24(smollm2_moe_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The upcycled MoE compressed once per session, data-free INT4 g64 + rank-24 correction on attention and
    every expert stack, saved."""
    from transformers import AutoModelForCausalLM

    from hf_svdq import SVDQuantConfig

    folder = tmp_path_factory.mktemp("smollm2-moe-int4-r24")
    config = SVDQuantConfig(rank=24, residual_bits=4, group_size=64)
    AutoModelForCausalLM.from_pretrained(smollm2_moe_path, quantization_config=config).save_pretrained(folder)
    return folder
