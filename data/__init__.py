"""Preference-data readers and tokenisation; the embedded synthetic world and its reference model."""
