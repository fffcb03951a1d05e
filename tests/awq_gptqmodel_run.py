"""Run an AWQ + LoRA export through transformers' own AWQ path (gptqmodel) and PEFT, in the interpreter of a
separate environment that has them (gptqmodel 7.6 needs torch>=2.8 and pulls torchao, datasets, pandas: it
is a test-only reader, not our dependency). Used by ``tests/test_export_awq.py``.

usage: python awq_gptqmodel_run.py EXPORT_FOLDER IDS.pt OUT.pt BACKEND DTYPE
Writes {"with_adapter": logits, "base_only": logits, "layer": class name of an AWQ layer} to OUT.pt.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

folder, ids_file, out_file, backend, dtype = sys.argv[1:6]
ids = torch.load(ids_file)
with tempfile.TemporaryDirectory() as tmp:
    copy = Path(tmp) / "model"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["backend"] = backend
    (copy / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(copy, device_map="cpu", dtype=getattr(torch, dtype))
    layer = type(model.model.layers[0].mlp.up_proj).__name__
    with torch.no_grad():
        base_only = model(ids).logits.float()
    if (copy / "adapter").is_dir():
        model = PeftModel.from_pretrained(model, copy / "adapter")
    with torch.no_grad():
        with_adapter = model(ids).logits.float()
torch.save({"with_adapter": with_adapter, "base_only": base_only, "layer": layer}, out_file)
print(layer)
