"""The Mistral-architecture decoder, readable top to bottom.

    tokens -> embed_tokens -> N x [x + attn(rmsnorm(x)); x + mlp(rmsnorm(x))] -> norm -> lm_head -> logits

Attention is grouped-query attention (GQA: `num_key_value_heads` key/value heads shared by
`num_attention_heads` query heads) with rotary position embeddings (RoPE) in the rotate-half convention that
HF-format checkpoints expect, and a causal mask that may be limited to a sliding window. The MLP is SwiGLU:
`down(silu(gate(x)) * up(x))`. Llama-2-style checkpoints (`model_type: llama`) share this architecture with no
sliding window and are accepted too.

Module names mirror HF's (`layers.0.self_attn.q_proj`, ...) so LoRA targets and PEFT adapter keys map one to
one; the HF checkpoint adds a `model.` prefix, which `models/checkpoint.py` maps explicitly.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("mistral", "llama")


class ConfigError(ValueError):
    """A config.json this implementation cannot build faithfully; the message names the file and the key."""


@dataclass
class MistralConfig:
    # Architecture fields have no defaults: they come from the checkpoint's config.json (from_hf_dict).
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    sliding_window: int | None  # None: full causal attention
    tie_word_embeddings: bool
    max_position_embeddings: int
    model_type: str = "mistral"
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window must be null or a positive integer, got {self.sliding_window!r}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json") -> "MistralConfig":
        """Build from an HF `config.json` dict. Both on-disk layouts occur: `rope_theta` at the top level (older
        files) and `rope_parameters.rope_theta` (newer); `head_dim` may be absent or differ from
        hidden_size / num_attention_heads; `sliding_window` may be null. Anything that would change the
        architecture in a way this implementation does not build (biases, RoPE scaling, another activation)
        is refused rather than silently ignored."""
        def fail(message):
            raise ConfigError(f"{source}: {message}")

        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            fail(f"model_type {model_type!r} is not supported; this implementation builds {SUPPORTED_MODEL_TYPES}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in hf:
                fail(f'missing key "{key}"')
        if hf.get("hidden_act", "silu") != "silu":
            fail(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                fail(f"{key}: true is not supported")
        rope_parameters = hf.get("rope_parameters") or {}
        rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
        if hf.get("rope_scaling") or rope_type != "default":
            fail(f"RoPE scaling ({hf.get('rope_scaling') or rope_type!r}) is not supported")
        rope_theta = rope_parameters.get("rope_theta", hf.get("rope_theta", 10000.0))
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        if model_type == "mistral":
            sliding_window = hf.get("sliding_window", 4096)  # HF's MistralConfig default when the key is absent
        else:
            sliding_window = None
        try:
            return cls(
                vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
                head_dim=head_dim, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(rope_theta),
                sliding_window=sliding_window, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 32768)), model_type=model_type,
                bos_token_id=hf.get("bos_token_id", 1), eos_token_id=hf.get("eos_token_id", 2))
        except ConfigError as error:
            fail(str(error))

    @classmethod
    def from_json(cls, path) -> "MistralConfig":
        path = Path(path)
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:  # Recursion: [[[[...]]]]
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(hf, source=str(path))

    def to_hf_dict(self) -> dict:
        """The config.json that HF transformers reads back into the same architecture."""
        fields = asdict(self)
        rope_theta = fields.pop("rope_theta")
        model_type = fields["model_type"]
        if model_type == "llama":
            fields.pop("sliding_window")
        architecture = "MistralForCausalLM" if model_type == "mistral" else "LlamaForCausalLM"
        return {"architectures": [architecture], **fields, "hidden_act": "silu", "rope_theta": rope_theta,
                "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"}}


class RMSNorm(nn.Module):
    """x -> weight * x / sqrt(mean(x^2) + eps), computed in float32 (float64 stays float64) and cast back to x's
    dtype before the weight, as HF and mistral-inference do (so bf16 results match theirs)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.float64):  # nothing to cast: the same
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # math as below, one fused kernel
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """cos and sin tables [..., T, head_dim] for absolute `positions` [..., T] (one row of positions per sequence
    when sequences start at different offsets, as in models/prefix.py), rotate-half layout: frequency i sits at
    columns i and i + head_dim/2. Computed in float32, then cast (as HF does)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i + hd/2}) by the position's angle: x * cos + rotate_half(x) * sin.
    HF checkpoints were permuted at conversion so that this rotate-half form equals Meta's interleaved form."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def attention_mask(query_positions, key_positions, sliding_window: int | None):
    """Boolean [..., Tq, Tk] from absolute positions [..., Tq] and [..., Tk], True where a query may attend: causal
    (key <= query) and, with a window, the last `sliding_window` positions, itself included
    (query - key < sliding_window), HF's convention."""
    distance = query_positions[..., :, None] - key_positions[..., None, :]  # (..., Tq, Tk)
    allowed = distance >= 0
    if sliding_window is not None:
        allowed = allowed & (distance < sliding_window)
    return allowed


class Attention(nn.Module):
    def __init__(self, config: MistralConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def project(self, x, cos, sin):
        """Queries, keys and values of x [B, T, D], rotated by RoPE: (B, nh, T, hd), (B, nkv, T, hd) x 2."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, mask, cache=None, start_pos: int = 0):
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)  # (B, nh, T, hd), (B, nkv, T, hd), (B, nkv, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_index, start_pos, k, v)  # (B, nkv, start_pos + T, hd)
        if mask is None:  # full causal attention over a fresh sequence: let SDPA pick its fused causal kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: MistralConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, config: MistralConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache=None, start_pos: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Keys and values of every layer for incremental decoding: [B, n_kv_heads, max_seq_len, head_dim] each.

    The cache keeps every position up to `max_seq_len` and the sliding window is applied by the attention mask
    (`attention_mask` on absolute positions). mistral-inference instead keeps a rotating buffer of `sliding_window`
    slots (position p lives in slot p % window), which saves memory only once a sequence outgrows the window; here
    the cache is sized to the generation at hand, and masking keeps the two exactly equal to a full forward.
    `pos` is the number of positions already written; `Mistral.forward(tokens, cache=cache)` starts there and
    advances it.
    """

    def __init__(self, config: MistralConfig, batch_size: int, max_seq_len: int, dtype=torch.float32, device=None):
        shape = (batch_size, config.num_key_value_heads, max_seq_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_seq_len = max_seq_len
        self.pos = 0

    def update(self, layer_index: int, start_pos: int, k, v):
        end = start_pos + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache overflow: position {end} > max_seq_len {self.max_seq_len}")
        self.keys[layer_index][:, :, start_pos:end] = k
        self.values[layer_index][:, :, start_pos:end] = v
        return self.keys[layer_index][:, :, :end], self.values[layer_index][:, :, :end]

    def reorder(self, index):
        """Keep batch rows `index` (e.g. to repeat one prefilled prompt N times)."""
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]


class Mistral(nn.Module):
    def __init__(self, config: MistralConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False

    def init_weights(self, std: float = 0.02, generator=None):
        """Random initialisation for models trained from scratch (HF's scheme: normal(0, std), norms at one)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with torch.no_grad():
                    module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        return self

    def hidden_states(self, tokens, cache: KVCache | None = None):
        """Final-norm hidden states [B, T, D] of `tokens` [B, T]; with a cache, tokens continue at cache.pos."""
        B, T = tokens.shape
        start_pos = cache.pos if cache is not None else 0
        x = self.embed_tokens(tokens)  # (B, T, D)
        positions = torch.arange(start_pos, start_pos + T, device=tokens.device)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        window = self.config.sliding_window
        if cache is None and (window is None or T <= window):
            mask = None  # plain causal
        else:
            key_positions = torch.arange(start_pos + T, device=tokens.device)
            mask = attention_mask(positions, key_positions, window)  # (T, start_pos + T)
        for block in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, cache, start_pos,
                                                      use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, start_pos)
        if cache is not None:
            cache.pos = start_pos + T
        return self.norm(x)

    def forward(self, tokens, cache: KVCache | None = None):
        """Logits [B, T, V] in float32 whatever the weights' dtype."""
        return self.lm_head(self.hidden_states(tokens, cache)).float()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def build_model(config: MistralConfig, dtype=None, device=None, seed: int | None = None) -> Mistral:
    """A randomly initialised model (for training from scratch and for tests)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    model = Mistral(config).init_weights(generator=generator)
    return model.to(dtype=dtype, device=device)


__all__ = ["MistralConfig", "ConfigError", "Mistral", "KVCache", "RMSNorm", "build_model", "attention_mask",
           "apply_rope", "rope_cos_sin"]
