"""Attention over a shared prefix without copying it per row (cascade attention).

The rows of a micro-batch share one prefix (system turn, instruction, query). Expanding the
prefix's keys and values to every row would copy rows x prefix x layers of them, which costs more
than the attention itself. Instead, each layer's attention reads the prefix once, broadcast
over the batch, and the row's own tokens apart:

    softmax([q . K_prefix, q . K_own] / sqrt(d) + mask) . [V_prefix, V_own]

one softmax (in fp32) over both parts, so it equals attention over the concatenation.

Wiring, through transformers' own extension points: `PREFIX_ATTENTION` is registered as an
attention implementation (and its mask function, sdpa's) and set on the decoder's config; it
runs stock sdpa unless the forward call passes `shared_prefix=` (a `SharedPrefixCache`), whose
layers report the prefix length (for masks and positions) but never concatenate it.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

PREFIX_ATTENTION = "rerank_prefix_sdpa"


class _PrefixLayer(DynamicLayer):
    """One layer's prefix keys/values (batch 1). `update` hands back the new tokens' states alone:
    the attention function reads the prefix from here."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return key_states, value_states


class SharedPrefixCache(DynamicCache):
    """The prefix's key/value cache as the decoder sees it for the rows that follow it."""

    def __init__(self, prefix: DynamicCache, config):
        super().__init__(config=config)
        self.layers = [_PrefixLayer(layer.keys, layer.values) for layer in prefix.layers]


QUERY_CHUNK = 1024  # queries per step: bounds the fp32 score block to B x H x 1024 x (P + S)


def prefix_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, shared_prefix=None, **kwargs):
    """query (B, H, S, D); key/value (B, Hkv, S, D) of the rows' own tokens; the prefix's
    (1, Hkv, P, D) from `shared_prefix`. `attention_mask` (B, 1, S, P + S), True = attend: its
    prefix part is all True (every row follows the whole prefix), its own part is causal with
    the rows' right padding. The prefix product runs as one matmul per kv head over every
    row's queries, so the prefix is never broadcast (copied) to the batch; long rows run in
    chunks of queries (each softmax is per query: exact). Scores are rounded to the inputs'
    dtype before the fp32 softmax, as transformers' eager attention does."""
    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer = shared_prefix.layers[module.layer_idx]
    pk, pv = layer.keys[0], layer.values[0]  # (Hkv, P, D)
    b, h, s, d = query.shape
    p = pk.shape[-2]
    scale = scaling if scaling is not None else d**-0.5
    if attention_mask is None:  # no padding: causal over the rows' own tokens
        own_allowed = torch.ones((s, s), dtype=torch.bool, device=query.device).tril()[None, None].expand(b, 1, s, s)
    else:
        own_allowed = attention_mask[..., p:].bool()
    chunks = [
        _attend(query[:, :, i : i + QUERY_CHUNK], key[:, :, : i + QUERY_CHUNK], value[:, :, : i + QUERY_CHUNK], pk, pv,
                own_allowed[:, :, i : i + QUERY_CHUNK, : i + QUERY_CHUNK], scale)
        for i in range(0, s, QUERY_CHUNK)
    ]  # fmt: skip
    out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _attend(query, key, value, pk, pv, own_allowed, scale):
    """One block of queries (B, H, S, D) over the prefix (Hkv, P, D) and the rows' own keys
    (B, Hkv, K, D) up to the block's end; returns (B, H, S, D)."""
    b, h, s, d = query.shape
    kv = key.shape[1]
    g = h // kv  # head h uses kv head h // g, as repeat_kv
    k_own = key.shape[2]
    q = query.reshape(b, kv, g * s, d)
    # Scores against the prefix, (Hkv, B*G*S, P), and against the rows' own tokens, (B, Hkv, G*S, K).
    to_prefix = torch.bmm(q.transpose(0, 1).reshape(kv, b * g * s, d), pk.transpose(-1, -2)).float().mul_(scale)
    to_own = (q @ key.transpose(-1, -2)).float().mul_(scale)
    allowed = own_allowed.expand(b, 1, s, k_own).unsqueeze(2).expand(b, 1, g, s, k_own).reshape(b, 1, g * s, k_own)
    to_own = to_own.masked_fill_(~allowed, float("-inf"))
    # One softmax over both parts: shared maximum, shared denominator.
    own_by_head = to_own.transpose(0, 1).reshape(kv, b * g * s, k_own)
    top = torch.maximum(to_prefix.amax(-1, keepdim=True), own_by_head.amax(-1, keepdim=True))
    e_prefix = to_prefix.sub_(top).exp_()
    e_own = own_by_head.sub(top).exp_()
    denom = e_prefix.sum(-1, keepdim=True) + e_own.sum(-1, keepdim=True)
    out = torch.bmm(e_prefix.div_(denom).to(value.dtype), pv)  # (Hkv, B*G*S, D)
    own_probs = e_own.div_(denom).to(value.dtype).view(kv, b, g * s, k_own).transpose(0, 1)
    out = out.view(kv, b, g * s, d).transpose(0, 1) + own_probs @ value  # (B, Hkv, G*S, D)
    return out.reshape(b, h, s, d)


AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)


def use_prefix_attention(text_config) -> None:
    """Route the decoder's attention through `prefix_attention` (stock sdpa unless a call passes a prefix)."""
    text_config._attn_implementation = PREFIX_ATTENTION
