"""The GGUF export run by llama.cpp itself (issue 12), through ``llama-cpp-python`` (the ``[serve-test]``
extra; it builds llama.cpp from source, ~10 minutes on 2 cores, so CI installs it for this test only).

SmolLM2 INT4 g64 + rank-24 correction, exported as Q4_1 base + GGUF LoRA adapter: llama.cpp's tokens
equal transformers' on the held-out passage, its perplexity is within 2% of ours, and its greedy
continuation agrees with ours for the first 16 tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_svdq.export_gguf import export_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="the [serve-test] extra (llama-cpp-python) is not installed")

pytestmark = [pytest.mark.real, pytest.mark.slow]

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def engines(smollm2_int4_r24, smollm2_path, text_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    result = export_gguf(smollm2_int4_r24, out, tokenizer=smollm2_path, progress=False)
    llm = llama_cpp.Llama(model_path=str(result.base), lora_path=str(result.adapter), n_ctx=1024, logits_all=True,
                          n_threads=2, verbose=False, seed=0)
    ours = AutoModelForCausalLM.from_pretrained(smollm2_int4_r24).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    text = (text_dir / "emma.txt").read_text(encoding="utf-8")[20000:26000]
    return llm, ours, tokenizer, text


def _llama_nll(llm, tokens: list[int]) -> float:
    llm.reset()
    llm.eval(tokens)
    scores = np.asarray(llm.scores[: len(tokens) - 1], dtype=np.float64)
    logz = np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1)) + scores.max(-1)
    return float(np.mean(logz - scores[np.arange(len(tokens) - 1), tokens[1:]]))


def test_llama_cpp_tokenizes_like_transformers(engines):
    llm, _, tokenizer, text = engines
    passage = text[:2000]
    assert llm.tokenize(passage.encode(), add_bos=False, special=False) == tokenizer(passage)["input_ids"]


def test_llama_cpp_perplexity_is_within_2_percent_of_ours(engines):
    llm, ours, tokenizer, text = engines
    tokens = tokenizer(text)["input_ids"][:512]
    with torch.no_grad():
        logits = ours(torch.tensor([tokens])).logits[0, :-1].double()
    our_nll = float(torch.nn.functional.cross_entropy(logits, torch.tensor(tokens[1:])))
    ratio = math.exp(_llama_nll(llm, tokens)) / math.exp(our_nll)
    print(f"llama.cpp / hf_svdq perplexity on 512 held-out tokens: {ratio:.4f}")
    assert abs(ratio - 1) < 0.02


def test_llama_cpp_greedy_tokens_agree_with_ours(engines):
    llm, ours, tokenizer, _ = engines
    prompt = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        mine = ours.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    llm.reset()
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        theirs.append(token)
        if len(theirs) == 16:
            break
    agree = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), 16)
    print(f"greedy agreement: {agree}/16 tokens ({tokenizer.decode(mine)!r} vs {tokenizer.decode(theirs)!r})")
    assert agree == 16
