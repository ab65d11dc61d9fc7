"""Preference data: row formats (formats.py), tokenization (tokenize.py), Ray Data pipeline."""
