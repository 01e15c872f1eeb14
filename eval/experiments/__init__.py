"""The paper's experiments in miniature on the embedded world, their shared plumbing, and diagnostics."""
