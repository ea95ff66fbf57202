"""Attention over a shared prefix without copying it per row (cascade attention).

The rows of a micro-batch share one prefix (system turn, instruction, query). Expanding the
prefix's keys and values to every row would copy rows x prefix x layers of them, which costs more
than the attention itself. Instead, each layer's attention reads the prefix once, broadcast
over the batch, and the row's own tokens apart:

    softmax([q . K_prefix, q . K_own] / sqrt(d) + mask) . [V_prefix, V_own]

computed in fp32 as one softmax over both parts, so it equals attention over the concatenation.

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


def prefix_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, shared_prefix=None, **kwargs):
    """query (B, H, S, D); key/value (B, Hkv, S, D) of the rows' own tokens; the prefix's
    (1, Hkv, P, D) from `shared_prefix`. `attention_mask` (B, 1, S, P + S), True = attend: its
    prefix part is all True (every row follows the whole prefix), its own part is causal with
    the rows' right padding. The prefix product runs as one matmul per kv head over every
    row's queries, so the prefix is never broadcast (copied) to the batch."""
    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer = shared_prefix.layers[module.layer_idx]
    pk, pv = layer.keys[0], layer.values[0]  # (Hkv, P, D)
    b, h, s, d = query.shape
    kv = key.shape[1]
    g = h // kv  # head h uses kv head h // g, as repeat_kv
    p = pk.shape[-2]
    scale = scaling if scaling is not None else d**-0.5
    q = query.reshape(b, kv, g * s, d)
    # Scores against the prefix, (Hkv, B*G*S, P), and against the rows' own tokens, (B, Hkv, G*S, S).
    q_by_head = q.transpose(0, 1).reshape(kv, b * g * s, d)
    to_prefix = torch.bmm(q_by_head, pk.transpose(-1, -2)).float().mul_(scale)
    to_own = (q @ key.transpose(-1, -2)).float().mul_(scale)
    if attention_mask is None:
        own_allowed = torch.ones((s, s), dtype=torch.bool, device=query.device).tril()[None, None]
    else:
        own_allowed = attention_mask[..., p:].bool()
    own_allowed = own_allowed.expand(b, 1, s, s).unsqueeze(2).expand(b, 1, g, s, s).reshape(b, 1, g * s, s)
    to_own = to_own.masked_fill_(~own_allowed, float("-inf"))
    # One softmax over both parts: shared maximum, shared denominator.
    own_by_head = to_own.transpose(0, 1).reshape(kv, b * g * s, s)
    top = torch.maximum(to_prefix.amax(-1, keepdim=True), own_by_head.amax(-1, keepdim=True))
    e_prefix = to_prefix.sub_(top).exp_()
    e_own = own_by_head.sub(top).exp_()
    denom = e_prefix.sum(-1, keepdim=True) + e_own.sum(-1, keepdim=True)
    out = torch.bmm(e_prefix.div_(denom).to(value.dtype), pv)  # (Hkv, B*G*S, D)
    own_probs = e_own.div_(denom).to(value.dtype).view(kv, b, g * s, s).transpose(0, 1)
    out = out.view(kv, b, g * s, d).transpose(0, 1) + own_probs @ value  # (B, Hkv, G*S, D)
    return out.reshape(b, h, s, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)


def use_prefix_attention(text_config) -> None:
    """Route the decoder's attention through `prefix_attention` (stock sdpa unless a call passes a prefix)."""
    text_config._attn_implementation = PREFIX_ATTENTION
