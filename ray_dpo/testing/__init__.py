"""Offline test assets: a synthetic preference task, a tiny tokenizer and a tiny model."""
