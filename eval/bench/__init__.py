"""Benchmarks: each script measures one part of the pipeline against a reference and prints the ratio."""
