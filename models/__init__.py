"""The Mistral-architecture decoder, its KV cache, tokenizer, hand-written LoRA and HF-format checkpoint I/O."""
from models.checkpoint import CheckpointError, load_pretrained, save_pretrained
from models.generate import generate
from models.mistral import ConfigError, KVCache, Mistral, MistralConfig, build_model

__all__ = ["MistralConfig", "ConfigError", "Mistral", "KVCache", "build_model", "load_pretrained", "save_pretrained",
           "CheckpointError", "generate"]
