"""The Mistral-architecture decoder, its KV cache, tokenizers, hand-written LoRA and HF-format checkpoint I/O.

Generation lives in `models.generate` (import from there: `from models.generate import generate`); it is not
re-exported here, so that `models.generate` always names the module, never the function.
"""
from models.checkpoint import CheckpointError, load_pretrained, save_pretrained
from models.lora import (AdapterError, LoRALinear, add_lora, disable_lora, load_lora_state_dict, lora_parameters,
                         lora_state_dict, merge_lora)
from models.mistral import ConfigError, KVCache, Mistral, MistralConfig, build_model
from models.peft import load_adapter, save_adapter
from models.bpe import BPETokenizer
from models.tokenizer import Tokenizer, load_tokenizer

__all__ = ["MistralConfig", "ConfigError", "Mistral", "KVCache", "build_model", "load_pretrained", "save_pretrained",
           "CheckpointError", "Tokenizer", "BPETokenizer", "load_tokenizer", "add_lora", "disable_lora", "merge_lora", "save_adapter",
           "load_adapter", "lora_parameters", "lora_state_dict", "load_lora_state_dict", "LoRALinear", "AdapterError"]
