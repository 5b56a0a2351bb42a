"""The challenge's baseline GPT, every part configurable from params.yaml's `model` section.

As in the official train_gpt.py: token embedding -> RMS norm -> blocks -> RMS norm -> (tied) head
with a tanh logit soft-cap. Each block mixes its input with the embedding output x0 (resid_mix),
then attention (GQA, q/k RMS norm, rotary, learnable per-head q gain) and a relu² MLP, each with a
learnable per-channel output scale. The first half of the blocks (encoder) store their outputs;
the second half (decoder) add them back in reverse order through learnable skip weights.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.errors import InputError


@dataclasses.dataclass(frozen=True)
class ModelParams:
    layers: int
    dim: int
    heads: int
    kv_heads: int  # grouped-query attention: heads share kv_heads key/value heads
    mlp_mult: int  # MLP hidden width = mlp_mult * dim, relu² activation
    vocab_size: int
    tie_embeddings: bool  # the output head is the token embedding
    logit_softcap: float  # logits = cap * tanh(logits / cap)
    rope_base: float
    qk_gain_init: float  # initial per-head gain on the RMS-normed queries
    tied_embed_init_std: float

    def __post_init__(self) -> None:
        for key in ("layers", "dim", "heads", "kv_heads", "mlp_mult", "vocab_size"):
            if getattr(self, key) < 1:
                raise InputError(f"params.yaml: model.{key} must be positive")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise InputError(f"params.yaml: model.dim ({self.dim}) must be an even multiple of model.heads ({self.heads}) for rotary")
        if self.heads % self.kv_heads:
            raise InputError(f"params.yaml: model.heads ({self.heads}) must be a multiple of model.kv_heads ({self.kv_heads})")
        if not self.logit_softcap > 0 or not self.rope_base > 0 or not self.tied_embed_init_std >= 0:
            raise InputError("params.yaml: model.logit_softcap and model.rope_base must be positive, model.tied_embed_init_std >= 0")



class CastedLinear(nn.Linear):
    """Float32 weights, cast to the activation dtype at matmul time (bf16 under autocast)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), self.inv_freq.to(device))
        return freqs.cos()[None, None].to(dtype), freqs.sin()[None, None].to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, rope_base: float, qk_gain_init: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.c_q = CastedLinear(dim, dim, bias=False)
        self.c_k = CastedLinear(dim, kv_heads * self.head_dim, bias=False)
        self.c_v = CastedLinear(dim, kv_heads * self.head_dim, bias=False)
        self.proj = CastedLinear(dim, dim, bias=False)
        self.proj._zero_init = True
        self.q_gain = nn.Parameter(torch.full((heads,), qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(self.head_dim, rope_base)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q = self.c_q(x).reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        cos, sin = self.rotary(t, x.device, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.fc = CastedLinear(dim, mult * dim, bias=False)
        self.proj = CastedLinear(mult * dim, dim, bias=False)
        self.proj._zero_init = True

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, p: ModelParams):
        super().__init__()
        self.attn = Attention(p.dim, p.heads, p.kv_heads, p.rope_base, p.qk_gain_init)
        self.mlp = MLP(p.dim, p.mlp_mult)
        self.attn_scale = nn.Parameter(torch.ones(p.dim))
        self.mlp_scale = nn.Parameter(torch.ones(p.dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(p.dim), torch.zeros(p.dim))))

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(F.rms_norm(x, (x.size(-1),)))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(F.rms_norm(x, (x.size(-1),)))


class GPT(nn.Module):
    def __init__(self, p: ModelParams):
        super().__init__()
        self.p = p
        self.tok_emb = nn.Embedding(p.vocab_size, p.dim)
        self.n_encoder = p.layers // 2
        self.n_decoder = p.layers - self.n_encoder
        self.skip_weights = nn.Parameter(torch.ones(min(self.n_encoder, self.n_decoder), p.dim))
        self.blocks = nn.ModuleList(Block(p) for _ in range(p.layers))
        self.lm_head = None if p.tie_embeddings else CastedLinear(p.dim, p.vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head._zero_init = True
        if p.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=p.tied_embed_init_std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and getattr(module, "_zero_init", False):
                nn.init.zeros_(module.weight)

    def hidden(self, idx: Tensor) -> Tensor:
        """The final RMS-normed hidden states [batch, seq, dim]: the output head's input."""
        x = F.rms_norm(self.tok_emb(idx), (self.p.dim,))
        x0, skips = x, []
        for block in self.blocks[: self.n_encoder]:
            x = block(x, x0)
            skips.append(x)
        for i, block in enumerate(self.blocks[self.n_encoder :]):
            if skips:
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            x = block(x, x0)
        return F.rms_norm(x, (self.p.dim,))

    def head_weight(self) -> Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def head(self, x: Tensor) -> Tensor:
        """Soft-capped next-token logits [..., vocab] from hidden states [..., dim]."""
        logits = F.linear(x, self.head_weight().to(x.dtype))
        cap = self.p.logit_softcap
        return cap * torch.tanh(logits / cap)

    def logits(self, idx: Tensor) -> Tensor:
        """Soft-capped next-token logits [batch, seq, vocab] for input ids [batch, seq]."""
        return self.head(self.hidden(idx))

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats), computed in float32."""
        logits = self.logits(idx)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
