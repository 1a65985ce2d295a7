"""Bundled evaluation data (JSONL); a package only so that setuptools ships these files."""
