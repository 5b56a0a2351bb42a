"""Run a record's own train_gpt.py model on CPU, for checking our import against the record's code itself.

The records import flash-attention 3 and Triton, which a CPU machine lacks. Their evaluation forward
uses neither Triton kernel (those are training-only), so Triton is stubbed, and flash attention becomes
PyTorch's scaled-dot-product attention with the same semantics (causal, grouped kv heads, and for
PR #1855's varlen call a block-diagonal mask from cu_seqlens). Everything else is the record's code.

Point PGOLF_RECORDS at a checkout of openai/parameter-golf's records/track_10min_16mb folder.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

RECORD_DIRS = {
    "1394": ("2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2", "train_gpt_human.py"),
    "1855": ("2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611", "train_gpt.py"),
}


def record_source(pr: str) -> Path | None:
    root = os.environ.get("PGOLF_RECORDS")
    if not root:
        return None
    folder, name = RECORD_DIRS[pr]
    path = Path(root) / folder / name
    return path if path.is_file() else None


class _Anything(types.ModuleType):
    """Any attribute, call or decorator: enough for module-level Triton definitions that are never launched."""

    def __getattr__(self, name: str):
        if name.startswith("__"):  # import machinery and torch's own Triton probes must see a plain module
            raise AttributeError(name)
        return _Anything(name)

    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else _Anything("call")

    def __getitem__(self, key):
        return _Anything("item")


def _attention(q, k, v, causal=True, mask=None):
    # [batch, seq, heads, dim] as flash attention takes it
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=causal and mask is None, enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)


def _flash_attn_func(q, k, v, causal=True, **_):
    return _attention(q, k, v, causal)


def _flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, window_size=(-1, -1), **_):
    t = q.size(0)
    segment = torch.bucketize(torch.arange(t, device=q.device), cu_seqlens_q.long().unique()[1:], right=True)
    mask = (segment[:, None] == segment[None, :]) & torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return _attention(q[None], k[None], v[None], mask=mask)[0]


def load_record_module(path: Path) -> types.ModuleType:
    """Import a record's train_gpt.py with flash attention and Triton replaced (see the module docstring)."""
    import torch._dynamo  # noqa: F401 - imported before the stubs exist, so torch's Triton probes see the truth
    import torch._dynamo.debug_utils  # noqa: F401
    import torch._inductor.codecache  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401

    fa = types.ModuleType("flash_attn_interface")
    fa.flash_attn_func, fa.flash_attn_varlen_func = _flash_attn_func, _flash_attn_varlen_func
    stubs = {"flash_attn_interface": fa}
    if importlib.util.find_spec("triton") is None:
        stubs.update({name: _Anything(name) for name in ("triton", "triton.language", "triton.tools", "triton.tools.tensor_descriptor")})
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location(f"record_{path.parent.name[:10]}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    if hasattr(module, "BOS_ID"):
        module.BOS_ID = 1  # set by the record's data loaders before any forward
    return module


def record_hyperparameters(module: types.ModuleType, **model) -> object:
    """The record's Hyperparameters with the given model settings (record names) on top of its defaults."""
    h = module.Hyperparameters()
    for key, value in model.items():
        setattr(h, key, value)
    return h


def record_settings(p, seq_len: int) -> dict:
    """Our model params as the records' Hyperparameters settings (their names); seq_len is the record's train_seq_len."""
    return dict(
        num_layers=p.layers, model_dim=p.dim, embedding_dim=p.dim, num_heads=p.heads, num_kv_heads=p.kv_heads,
        mlp_mult=p.mlp_mult, vocab_size=p.vocab_size, tie_embeddings=p.tie_embeddings, logit_softcap=p.logit_softcap,
        rope_base=p.rope_base, qk_gain_init=p.qk_gain_init, tied_embed_init_std=p.tied_embed_init_std, rope_dims=p.rope_dims,
        ln_scale=p.layer_norm_scale, xsa_last_n=p.xsa_last, skip_gates_enabled=p.skip_gates, num_loops=p.loops,
        loop_start=p.loop_start, loop_end=p.loop_end, parallel_start_layer=p.parallel_start, parallel_final_lane=p.parallel_final,
        smear_gate_enabled=p.smear_gate, sparse_attn_gate_enabled=p.attn_gate, sparse_attn_gate_scale=p.attn_gate_scale,
        gate_window=p.gate_window, train_seq_len=seq_len, rope_yarn=bool(p.rope_scale_len), fused_ce_enabled=False,
    )
