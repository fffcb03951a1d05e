"""Measuring a model: perplexity, KL and agreement against a reference, repetition loops, the post-compress check."""
