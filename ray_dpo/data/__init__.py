"""Preference data: row formats (formats.py), tokenization (tokenize.py, fitting.py,
counters.py), Ray Data pipeline (pipeline.py and its stages)."""
