"""Compressing a loaded model: the per-layer plan, the data-dependent compression passes, healing."""
