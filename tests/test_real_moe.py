"""The upcycled SmolLM2 mixture of experts (real weights): dense quality, compression, llama.cpp. Slow (minutes)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_svdq.calibration.source import HELDOUT_TEXT
from hf_svdq.evaluation.metrics import EvalSettings, perplexity_and_agreement, tokenize_text

pytestmark = [pytest.mark.real, pytest.mark.slow]

TOKENS = 512


def _perplexity(model, ids: torch.Tensor) -> float:  # type: ignore[no-untyped-def]
    return float(perplexity_and_agreement(model, ids, EvalSettings(window=512, stride=512, max_tokens=TOKENS),
                                          progress=False)["perplexity"])


@pytest.fixture(scope="module")
def heldout_ids(smollm2_path) -> torch.Tensor:  # type: ignore[no-untyped-def]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    return tokenize_text(tokenizer, HELDOUT_TEXT.read_text(encoding="utf-8"), TOKENS)


def test_upcycled_moe_is_smollm2_and_compresses_every_expert(smollm2_path, smollm2_int4_r24, smollm2_moe_path,
                                                              smollm2_moe_int4_r24, heldout_ids) -> None:
    """Dense: the near-copy experts with normalised top-2 weights reproduce SmolLM2. Compressed data-free (INT4 g64 +
    rank 24 everywhere): every expert stack compressed, coverage > 99%, and the perplexity ratio to its own dense
    model within 0.02 of SmolLM2's at the same setting (measured: 1.1473x against 1.1413x on these 512 tokens)."""
    smol = _perplexity(AutoModelForCausalLM.from_pretrained(smollm2_path).eval(), heldout_ids)
    smol_ratio = _perplexity(AutoModelForCausalLM.from_pretrained(smollm2_int4_r24).eval(), heldout_ids) / smol
    dense = _perplexity(AutoModelForCausalLM.from_pretrained(smollm2_moe_path).eval(), heldout_ids)
    ratio = _perplexity(AutoModelForCausalLM.from_pretrained(smollm2_moe_int4_r24).eval(), heldout_ids) / dense
    coverage = json.loads((smollm2_moe_int4_r24 / "config.json").read_text())["quantization_config"]["coverage"]
    print(f"perplexity: SmolLM2 {smol:.3f}, upcycled MoE {dense:.3f}; compressed: SmolLM2 {smol_ratio:.4f}x, "
          f"MoE {ratio:.4f}x; coverage {coverage}")
    assert abs(dense / smol - 1) < 0.01
    assert coverage["share_of_non_embedding"] > 0.99 and abs(ratio - smol_ratio) < 0.02


def test_llama_cpp_runs_the_upcycled_moe_export(smollm2_moe_int4_r24, smollm2_path, heldout_ids, tmp_path) -> None:
    """Real weights in llama.cpp: the MoE export (Q4_1 experts + 3-D expert LoRA) scores the held-out text within
    2% of our perplexity and agrees on the top-1 token at >= 90% of the positions."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="the [serve-test] extra (llama-cpp-python) is not installed")
    from hf_svdq.publishing.gguf_export import export_gguf

    result = export_gguf(smollm2_moe_int4_r24, tmp_path, tokenizer=smollm2_path, progress=False)
    tokens = heldout_ids[0].tolist()
    ours = AutoModelForCausalLM.from_pretrained(smollm2_moe_int4_r24).eval()
    with torch.no_grad():
        logits = ours(torch.tensor([tokens])).logits[0, :-1].double()
    our_nll = float(torch.nn.functional.cross_entropy(logits, torch.tensor(tokens[1:])))
    llm = llama_cpp.Llama(model_path=str(result.base), lora_path=str(result.adapter), n_ctx=1024, logits_all=True,
                          n_threads=2, verbose=False)
    llm.eval(tokens)
    scores = np.asarray(llm.scores[: len(tokens) - 1], dtype=np.float64)
    logz = np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1)) + scores.max(-1)
    their_nll = float(np.mean(logz - scores[np.arange(len(tokens) - 1), tokens[1:]]))
    ratio = math.exp(their_nll) / math.exp(our_nll)
    agreement = float((scores.argmax(-1) == logits.argmax(-1).numpy()).mean())
    print(f"upcycled MoE in llama.cpp: perplexity ratio to ours {ratio:.4f}, top-1 agreement {agreement:.3f}, "
          f"files {result.summary()['files']}")
    assert abs(ratio - 1) < 0.02 and agreement >= 0.9
