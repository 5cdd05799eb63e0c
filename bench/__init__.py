"""Benchmarks: each writes bench/results/<name>.json and a markdown table (python -m bench.<name>)."""
