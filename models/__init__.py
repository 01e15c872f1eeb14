"""The Mistral-architecture decoder, its KV cache, tokenizer, hand-written LoRA and HF-format checkpoint I/O."""
