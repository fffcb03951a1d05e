"""Publishing: the Hub (push with a card), model cards, and exports for serving engines (GGUF, AWQ + LoRA)."""
