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

from models.bf16 import attention

SUPPORTED_MODEL_TYPES = ("mistral", "llama")


class ConfigError(ValueError):
    """A config.json this implementation cannot build faithfully; the message names the file and the key."""


def _eos_token_id(hf: dict, source: str):
    """eos_token_id as the file has it: an id, null, or (HF allows it) a non-empty list of ids."""
    from models.fields import MAX_DIMENSION, integer
    value = hf.get("eos_token_id", 2)
    for index, item in enumerate(value if isinstance(value, list) and value else [value]):
        integer({"eos_token_id": item}, "eos_token_id", source if index == 0 else f"{source}: item {index} of",
                ConfigError, low=0, high=MAX_DIMENSION, nullable=not isinstance(value, list))
    return value


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
        is refused rather than silently ignored. Every field is read by models/fields.py's checked reader:
        its type (`sliding_window: true` is not a window of one token), range and finiteness."""
        from models.fields import MAX_DIMENSION, boolean, integer, mapping, number, show, string

        def fail(message):
            raise ConfigError(f"{source}: {message}")

        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            fail(f"model_type {model_type!r:.60} is not supported; this implementation builds {SUPPORTED_MODEL_TYPES}")
        size = dict(source=source, error=ConfigError, low=1, high=MAX_DIMENSION)
        dims = {key: integer(hf, key, **size) for key in ("vocab_size", "hidden_size", "intermediate_size",
                                                          "num_hidden_layers", "num_attention_heads")}
        if string(hf, "hidden_act", source, ConfigError, default="silu") != "silu":
            fail(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        for key in ("attention_bias", "mlp_bias"):
            if boolean(hf, key, source, ConfigError, default=False):
                fail(f"{key}: true is not supported")
        rope_parameters = mapping(hf, "rope_parameters", source, ConfigError, default={})
        rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
        if hf.get("rope_scaling") or rope_type != "default":
            fail(f"RoPE scaling ({show(hf.get('rope_scaling') or rope_type)}) is not supported")
        rope_theta = number(rope_parameters, "rope_theta", f"{source}: rope_parameters", ConfigError,
                            default=None, low=0, low_open=True)
        if rope_theta is None:
            rope_theta = number(hf, "rope_theta", source, ConfigError, default=10000.0, low=0, low_open=True)
        heads = dims["num_attention_heads"]
        head_dim = integer(hf, "head_dim", **size, default=None) or dims["hidden_size"] // heads
        sliding_window = None
        if model_type == "mistral":  # HF's MistralConfig default is 4096 when the key is absent; null: none
            sliding_window = hf.get("sliding_window", 4096)
            if sliding_window is not None and (not isinstance(sliding_window, int) or isinstance(sliding_window, bool)
                                               or not 0 < sliding_window <= 1 << 31):
                fail(f"sliding_window must be null or a positive integer, got {show(sliding_window)}")
        token_id = dict(source=source, error=ConfigError, low=0, high=MAX_DIMENSION, nullable=True)
        try:
            return cls(
                vocab_size=dims["vocab_size"], hidden_size=dims["hidden_size"],
                intermediate_size=dims["intermediate_size"], num_hidden_layers=dims["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=integer(hf, "num_key_value_heads", **size, default=None) or heads,
                head_dim=head_dim, rms_norm_eps=number(hf, "rms_norm_eps", source, ConfigError, default=1e-6,
                                                       low=0, high=1, low_open=True),
                rope_theta=rope_theta, sliding_window=sliding_window,
                tie_word_embeddings=boolean(hf, "tie_word_embeddings", source, ConfigError, default=False),
                max_position_embeddings=integer(hf, "max_position_embeddings", source, ConfigError, default=32768,
                                                low=1, high=1 << 31),
                model_type=model_type, bos_token_id=integer(hf, "bos_token_id", **token_id, default=1),
                eos_token_id=_eos_token_id(hf, source))
        except ConfigError as error:
            fail(str(error))

    @classmethod
    def from_json(cls, path) -> "MistralConfig":
        from models.fields import read_json_object
        return cls.from_hf_dict(read_json_object(path, ConfigError), source=str(path))

    def num_parameters(self) -> int:
        """The parameter count of Mistral(self), from the config alone (no module built; a config claiming huge
        sizes is measured before anything is allocated): per layer q, k, v, o (D x nh*hd, D x nkv*hd twice,
        nh*hd x D), the SwiGLU MLP (3 x D x I) and two norms (2D); plus the embedding (V x D), the final norm
        (D) and the output head (V x D) unless tied."""
        D, I, V, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attention = D * self.num_attention_heads * hd * 2 + D * self.num_key_value_heads * hd * 2
        layer = attention + 3 * D * I + 2 * D
        return self.num_hidden_layers * layer + V * D + D + (0 if self.tie_word_embeddings else V * D)

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
        # models/bf16.py: SDPA itself, or in float32 for bf16 on a CPU without bf16 units (4x faster there)
        if mask is None:  # full causal attention over a fresh sequence: let SDPA pick its fused causal kernel
            y = attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up for the backward pass and recomputing silu(gate) there.

    Written as `F.silu(gate) * up`, autograd keeps three [N, F] tensors per layer: gate (silu's backward), silu(gate)
    and up (the product's); the product itself is kept by down_proj's LoRA branch. Here silu(gate) is recomputed,
    one [N, F] fewer: at SmolLM2's shape 1536 of the ~11,500 floats a layer keeps per token. The backward pass calls
    the kernels autograd calls (aten.silu_backward; the product rule), so gradients are bit-identical:

        d/d up = grad * silu(gate)        d/d gate = silu_backward(grad * up, gate)
    """

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def swiglu(gate, up):
    """silu(gate) * up; with autograd, through _SwiGLU (the same values and gradients, less memory)."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, config: MistralConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):  # SwiGLU: down(silu(gate x) * up x)
        gate, up = self.gate_proj(x), self.up_proj(x)
        if hasattr(self.down_proj, "from_swiglu"):  # a LoRA layer (models/lora.py): the product is not kept
            return self.down_proj.from_swiglu(gate, up)
        return self.down_proj(swiglu(gate, up))


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


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding(num, dim), left uninitialised when built on the meta device to be loaded (load_pretrained):
    normal_ on a meta tensor imports torch._dynamo, 2-4 s of a process's start-up, for values never used."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


class Mistral(nn.Module):
    def __init__(self, config: MistralConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
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
