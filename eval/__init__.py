"""Metrics, the paper's experiments in miniature, and benchmarks."""
