"""The challenge's baseline GPT and the record line's features on it, every part a param of params.yaml's `model`.

The baseline (the official train_gpt.py): token embedding -> RMS norm -> blocks -> RMS norm -> (tied)
head with a tanh logit soft-cap. Each block mixes its input with the embedding output x0 (resid_mix),
then attention (GQA, q/k RMS norm, rotary, learnable per-head q gain) and a relu² MLP, each with a
learnable per-channel output scale. The first half of the blocks (encoder) store their outputs; the
second half (decoder) add them back in reverse order through learnable skip weights.

The record family (PR #1394 -> #1855) adds, each off by default: a leaky-relu² MLP of any width, partial
rotary, a per-layer norm scale, XSA, gated skips, two parallel residual lanes in the last layers, depth
recurrence (a span of layers run several times), SmearGate, a sparse per-head attention output gate and
attention confined to each document.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.errors import InputError

BOS_ID = 1  # every document starts with it (pgolf's tokenizers and the challenge's); SmearGate never crosses it


@dataclasses.dataclass(frozen=True)
class ModelParams:
    layers: int
    dim: int
    heads: int
    kv_heads: int  # grouped-query attention: heads share kv_heads key/value heads
    mlp_mult: float  # MLP hidden width = int(mlp_mult * dim)
    vocab_size: int
    tie_embeddings: bool  # the output head is the token embedding
    logit_softcap: float  # logits = cap * tanh(logits / cap)
    rope_base: float
    qk_gain_init: float  # initial per-head gain on the RMS-normed queries
    tied_embed_init_std: float
    # The record family; each default keeps the baseline.
    mlp_activation: str = "relu2"  # relu2 | leaky_relu2
    leaky_slope: float = 0.5  # leaky_relu2's negative slope
    rope_dims: int = 0  # rotary on the first rope_dims of each head, the rest unrotated; 0 = the whole head
    rope_scale_len: int = 0  # longer sequences get an NTK-scaled rotary base (#1394's "yarn"); 0 = never
    layer_norm_scale: bool = False  # each block's normed inputs times 1/sqrt(layer + 1)
    xsa_last: int = 0  # the last N layers remove from each head's output its part along its own value (XSA)
    skip_gates: bool = False  # a decoder layer blends its skip by a learned sigmoid gate instead of adding it
    parallel_start: int = 0  # decoder layers from this index run attention and MLP on two lanes; 0 = off
    parallel_final: str = "mean"  # mean | attn | mlp: what the final norm reads from the two lanes
    loops: int = 0  # depth recurrence: layers loop_start..loop_end run 1 + loops times; 0 = off
    loop_start: int = 0
    loop_end: int = 0
    smear_gate: bool = False  # each token's embedding gets a gated share of the previous one's, never across BOS
    attn_gate: bool = False  # sparse attention output gate: per-head sigmoid of the first gate_window input dims
    attn_gate_scale: float = 1.0
    gate_window: int = 12  # input dims the smear and attention gates read
    doc_attention: bool = False  # attention never crosses a BOS (PR #1855 trains and scores packed documents so)
    init: str = "default"  # default (nn.Linear's) | orthogonal (the records: every matrix of at least 64 x 64)

    def __post_init__(self) -> None:
        for key in ("layers", "dim", "heads", "kv_heads", "vocab_size", "gate_window"):
            if getattr(self, key) < 1:
                raise InputError(f"params.yaml: model.{key} must be positive")
        head_dim = self.dim // self.heads
        if self.dim % self.heads or head_dim % 2:
            raise InputError(f"params.yaml: model.dim ({self.dim}) must be an even multiple of model.heads ({self.heads}) for rotary")
        if self.heads % self.kv_heads:
            raise InputError(f"params.yaml: model.heads ({self.heads}) must be a multiple of model.kv_heads ({self.kv_heads})")
        if not self.logit_softcap > 0 or not self.rope_base > 0 or not self.tied_embed_init_std >= 0:
            raise InputError("params.yaml: model.logit_softcap and model.rope_base must be positive, model.tied_embed_init_std >= 0")
        if not (0 < self.mlp_mult < math.inf and int(self.mlp_mult * self.dim) >= 1):
            raise InputError(f"params.yaml: model.mlp_mult is {self.mlp_mult}; it must give a positive hidden width")
        if (self.smear_gate or self.attn_gate) and self.gate_window > self.dim:
            raise InputError(f"params.yaml: model.gate_window ({self.gate_window}) must be at most model.dim ({self.dim})")
        choices = {"mlp_activation": ("relu2", "leaky_relu2"), "parallel_final": ("mean", "attn", "mlp"), "init": ("default", "orthogonal")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise InputError(f"params.yaml: model.{key} is {getattr(self, key)!r}; use {' | '.join(allowed)}")
        if self.rope_dims < 0 or self.rope_dims % 2 or self.rope_dims > head_dim:
            raise InputError(f"params.yaml: model.rope_dims is {self.rope_dims}; use an even number up to the head size {head_dim} (0 = all)")
        if self.rope_scale_len < 0 or (self.rope_scale_len and (self.rope_dims or head_dim) < 4):
            raise InputError("params.yaml: model.rope_scale_len must be >= 0, with at least 4 rotary dims when set")
        if not 0 <= self.xsa_last <= self.layers:
            raise InputError(f"params.yaml: model.xsa_last is {self.xsa_last}; use 0..{self.layers}")
        if self.loops < 0 or (self.loops and not 0 <= self.loop_start <= self.loop_end < self.layers):
            raise InputError(f"params.yaml: model.loops needs 0 <= model.loop_start <= model.loop_end < {self.layers}")
        if self.parallel_start:
            for looping in (False, True):
                enc, dec = split(layer_order(self, looping))
                lanes = [i >= self.parallel_start for i in dec]
                if any(i >= self.parallel_start for i in enc) or lanes != sorted(lanes):
                    raise InputError(f"params.yaml: model.parallel_start ({self.parallel_start}) must begin a tail of the decoder's layers, "
                                     f"with depth recurrence on and off (decoder order {dec})")


def layer_order(p: ModelParams, looping: bool = True) -> list[int]:
    """The blocks in the order they run: with depth recurrence, loop_start..loop_end repeat `loops` more times."""
    if not (p.loops and looping):
        return list(range(p.layers))
    span = list(range(p.loop_start, p.loop_end + 1))
    return list(range(p.loop_start)) + span * (p.loops + 1) + list(range(p.loop_end + 1, p.layers))


def split(order: list[int]) -> tuple[list[int], list[int]]:
    """Encoder (first half, outputs kept for the skips) and decoder runs of a layer order."""
    return order[: len(order) // 2], order[len(order) // 2 :]


class CastedLinear(nn.Linear):
    """Float32 weights, cast to the activation dtype at matmul time (bf16 under autocast)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Rotary(nn.Module):
    """cos and sin [1, seq, 1, dims/2] for rotating the first `dims` of each head."""

    def __init__(self, dims: int, base: float, scale_len: int = 0):
        super().__init__()
        self.dims, self.base, self.scale_len = dims, base, scale_len

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        base = self.base
        if self.scale_len and seq_len > self.scale_len:  # NTK-aware: stretch the longest wavelengths to the new length
            base = base * (seq_len / self.scale_len) ** (self.dims / (self.dims - 2))
        inv_freq = 1.0 / (base ** (torch.arange(0, self.dims, 2, dtype=torch.float32, device=device) / self.dims))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos()[None, :, None].to(dtype), freqs.sin()[None, :, None].to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first 2 * cos.size(-1) dims of x [..., seq, heads, head_dim] pairwise (half i with half i + d/2)."""
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


def document_mask(idx: Tensor) -> Tensor:
    """[batch, 1, seq, seq]: query i may attend key j <= i of its own document (a BOS starts a new one)."""
    doc = (idx == BOS_ID).cumsum(-1)
    causal = torch.ones(idx.size(-1), idx.size(-1), dtype=torch.bool, device=idx.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def remove_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA: each head's output y [b, t, heads, d] minus its projection on its own position's unit value v [b, t, kv_heads, d]."""
    b, t, heads, d = y.shape
    y = y.reshape(b, t, v.size(2), heads // v.size(2), d)
    vn = F.normalize(v, dim=-1).unsqueeze(3)
    return (y - (y * vn).sum(-1, keepdim=True) * vn).reshape(b, t, heads, d)


class Attention(nn.Module):
    def __init__(self, p: ModelParams, xsa: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = p.heads, p.kv_heads, p.dim // p.heads
        self.c_q = CastedLinear(p.dim, p.dim, bias=False)
        self.c_k = CastedLinear(p.dim, p.kv_heads * self.head_dim, bias=False)
        self.c_v = CastedLinear(p.dim, p.kv_heads * self.head_dim, bias=False)
        self.proj = CastedLinear(p.dim, p.dim, bias=False)
        self.proj._zero_init = True
        self.q_gain = nn.Parameter(torch.full((p.heads,), p.qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(p.rope_dims or self.head_dim, p.rope_base, p.rope_scale_len)
        self.xsa = xsa
        self.gate_window, self.gate_scale = p.gate_window, p.attn_gate_scale
        self.gate = nn.Parameter(torch.zeros(p.heads, p.gate_window)) if p.attn_gate else None

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, t, d = x.shape
        q = self.c_q(x).reshape(b, t, self.heads, self.head_dim)
        k = self.c_k(x).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.c_v(x).reshape(b, t, self.kv_heads, self.head_dim)
        q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        cos, sin = self.rotary(t, x.device, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[:, None]
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask is None, enable_gqa=self.kv_heads != self.heads
        ).transpose(1, 2)
        if self.xsa:
            y = remove_self_value(y, v)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate_scale * F.linear(x[..., : self.gate_window], self.gate.to(x.dtype)))[..., None]
        return self.proj(y.reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, p: ModelParams):
        super().__init__()
        hidden = int(p.mlp_mult * p.dim)
        self.fc = CastedLinear(p.dim, hidden, bias=False)
        self.proj = CastedLinear(hidden, p.dim, bias=False)
        self.proj._zero_init = True
        self.slope = p.leaky_slope if p.mlp_activation == "leaky_relu2" else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h = torch.relu(h) if self.slope is None else F.leaky_relu(h, self.slope)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, p: ModelParams, index: int):
        super().__init__()
        self.attn = Attention(p, xsa=index >= p.layers - p.xsa_last)
        self.mlp = MLP(p)
        self.attn_scale = nn.Parameter(torch.ones(p.dim))
        self.mlp_scale = nn.Parameter(torch.ones(p.dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(p.dim), torch.zeros(p.dim))))
        self.norm_scale = 1 / math.sqrt(index + 1) if p.layer_norm_scale else 1.0

    def norm(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),)) * self.norm_scale

    def forward(self, x: Tensor, x0: Tensor, mask: Tensor | None = None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(self.norm(x), mask)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(self.norm(x))

    def lanes(self, attn_lane: Tensor, mlp_lane: Tensor, x0: Tensor, resid: Tensor, post: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Parallel residual: attention reads the attention lane (mixed with x0), the MLP reads the MLP lane; each
        lane keeps resid[lane] of itself and gets post[0, lane] of the attention output and post[1, lane] of the MLP's."""
        mix, resid, post = self.resid_mix.to(x0.dtype), resid.to(x0.dtype), post.to(x0.dtype)
        a = self.attn_scale.to(x0.dtype) * self.attn(self.norm(mix[0] * attn_lane + mix[1] * x0), mask)
        m = self.mlp_scale.to(x0.dtype) * self.mlp(self.norm(mlp_lane))
        return resid[0] * attn_lane + post[0, 0] * a + post[1, 0] * m, resid[1] * mlp_lane + post[0, 1] * a + post[1, 1] * m


class SmearGate(nn.Module):
    """x_t += λ · sigmoid(w · x_t[:window]) · x_{t-1}, except where token t is BOS: nothing crosses into a document."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window
        self.gate = CastedLinear(window, 1, bias=False)
        self.gate._zero_init = True
        self.lam = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        g = self.lam.to(x.dtype) * torch.sigmoid(self.gate(x[:, 1:, : self.window]))
        not_bos = (idx[:, 1:] != BOS_ID).to(x.dtype)[..., None]
        return torch.cat((x[:, :1], x[:, 1:] + g * x[:, :-1] * not_bos), dim=1)


class GPT(nn.Module):
    def __init__(self, p: ModelParams):
        super().__init__()
        self.p = p
        self.looping = True  # depth recurrence runs (when model.loops > 0); training may start with it off
        self.tok_emb = nn.Embedding(p.vocab_size, p.dim)
        skips = min(len(half) for half in split(layer_order(p)))
        self.skip_weights = nn.Parameter(torch.ones(skips, p.dim))
        self.skip_gates = nn.Parameter(torch.zeros(skips, p.dim)) if p.skip_gates else None
        self.blocks = nn.ModuleList(Block(p, i) for i in range(p.layers))
        self.lm_head = None if p.tie_embeddings else CastedLinear(p.dim, p.vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head._zero_init = True
        if p.parallel_start:  # one row per layer, as the record keeps them
            self.lane_resid = nn.Parameter(torch.full((p.layers, 2), 1.1))
            self.lane_post = nn.Parameter(torch.ones(p.layers, 2, 2))
        self.smear = SmearGate(p.gate_window) if p.smear_gate else None
        if p.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=p.tied_embed_init_std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and getattr(module, "_zero_init", False):
                nn.init.zeros_(module.weight)
            elif isinstance(module, nn.Linear) and p.init == "orthogonal" and min(module.weight.shape) >= 64:
                nn.init.orthogonal_(module.weight)

    def skip(self, j: int, x: Tensor, kept: Tensor) -> Tensor:
        """Decoder run j takes back an encoder output: added with a weight, or blended by a sigmoid gate."""
        scaled = self.skip_weights[j].to(x.dtype) * kept
        if self.skip_gates is None:
            return x + scaled
        return torch.lerp(scaled, x, torch.sigmoid(self.skip_gates[j].to(x.dtype)))

    def hidden(self, idx: Tensor) -> Tensor:
        """The final RMS-normed hidden states [batch, seq, dim]: the output head's input."""
        x = self.tok_emb(idx)
        if self.smear is not None:
            x = self.smear(x, idx)
        x = F.rms_norm(x, (self.p.dim,))
        x0, skips, lanes = x, [], None
        mask = document_mask(idx) if self.p.doc_attention else None
        encoder, decoder = split(layer_order(self.p, self.looping))
        for i in encoder:
            x = self.blocks[i](x, x0, mask)
            skips.append(x)
        for j, i in enumerate(decoder):
            if lanes is None and self.p.parallel_start and i >= self.p.parallel_start:
                lanes = (x, x)
            if j < len(self.skip_weights) and skips:
                if lanes is None:
                    x = self.skip(j, x, skips.pop())
                else:
                    lanes = (self.skip(j, lanes[0], skips.pop()), lanes[1])
            if lanes is None:
                x = self.blocks[i](x, x0, mask)
            else:
                lanes = self.blocks[i].lanes(*lanes, x0, self.lane_resid[i], self.lane_post[i], mask)
        if lanes is not None:
            x = self.final_lane(*lanes)
        return F.rms_norm(x, (self.p.dim,))

    def final_lane(self, attn_lane: Tensor, mlp_lane: Tensor) -> Tensor:
        final = self.p.parallel_final
        return attn_lane if final == "attn" else mlp_lane if final == "mlp" else 0.5 * (attn_lane + mlp_lane)

    def head_weight(self) -> Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def head(self, x: Tensor, extra: Tensor | None = None) -> Tensor:
        """Soft-capped next-token logits [..., vocab] from hidden states [..., dim]; `extra` is added before the
        cap (a test-time adapter's correction, pgolf/lora.py)."""
        logits = F.linear(x, self.head_weight().to(x.dtype))
        if extra is not None:
            logits = logits + extra
        cap = self.p.logit_softcap
        return cap * torch.tanh(logits / cap)

    def logits(self, idx: Tensor) -> Tensor:
        """Soft-capped next-token logits [batch, seq, vocab] for input ids [batch, seq]."""
        return self.head(self.hidden(idx))

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats), computed in float32."""
        logits = self.logits(idx)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
