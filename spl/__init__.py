"""Soft Preference Learning: the SPL/DPO loss family, fused sequence log-probs, closed-form optima."""
