"""Benchmarks: each prints ratios against a baseline measured in the same run (figures in docs/results.md)."""
