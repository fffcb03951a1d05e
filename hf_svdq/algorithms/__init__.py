"""Algorithms on tensors (no transformers): truncated SVD and INT8 factors, group quantization and GPTQ,
whitening, rank budgets and bit/rank allocation."""
