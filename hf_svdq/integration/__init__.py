"""The transformers integration: the config, the ``HfQuantizer`` hooks, registration, PEFT LoRA; the only
code that touches the quantizer API."""
