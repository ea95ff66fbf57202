"""Attention over shared prefixes without copying them per row (cascade attention).

The rows of a micro-batch follow prefixes (system turn, instruction, query): several requests'
rows can share one micro-batch, each row after its own request's prefix. Expanding a prefix's
keys and values to every row would copy rows x prefix x layers of them, which costs more than
the attention itself. Instead, each layer's attention reads each prefix once, broadcast over its
group's rows, and the rows' own tokens apart:

    softmax([q . K_prefix, q . K_own] / sqrt(d) + mask) . [V_prefix, V_own]

one softmax (in fp32) over both parts, so it equals attention over the concatenation.

The rows are laid out by group for this (`GroupLayout`): Gp slot groups x R slots, so that each
prefix multiplies its own rows' queries in one batched matmul over every group. A group with
fewer than R rows fills its spare slots with copies of one of its rows, whose outputs are
dropped; a group with more takes several slot groups, its prefix read once for each (a copy per
R rows, never per row).

Wiring, through transformers' own extension points: `PREFIX_ATTENTION` is registered as an
attention implementation (and its mask function, sdpa's) and set on the decoder's config; it
runs stock sdpa unless the forward call passes `shared_prefix=` (a `SharedPrefixCache`), whose
layers report the prefixes' padded length (for masks and positions) but never concatenate them.
The mask says which prefix tokens each row sees (its own prefix's length: shorter prefixes are
right-padded in the cache).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

PREFIX_ATTENTION = "rerank_prefix_sdpa"


@dataclass(frozen=True)
class GroupLayout:
    """Which prefix each row of a micro-batch follows, as the rows are laid out for the attention:
    Gp slot groups x `per_group` slots, each slot group after one prefix. Index tensors are None
    where the rows (or the cache's prefixes) are in that order already."""

    groups: torch.Tensor | None  # (Gp,) each slot group's prefix in the cache; None: the cache's, in order
    slots: torch.Tensor | None  # (Gp * R,) the row in each slot; None: the rows are the slots
    place: torch.Tensor | None  # (B,) each row's slot
    per_group: int  # R
    lengths: tuple[int, ...]  # (Gp,) each slot group's prefix tokens (the cache pads shorter ones)
    # (Gp, max(lengths)) True = a prefix token (the mask's prefix part, which costs a pass over the
    # score block per layer to read); None: the prefixes are equally long, nothing to mask.
    allowed: torch.Tensor | None

    @classmethod
    def of(cls, row_groups: Sequence[int], prefix_lengths: Sequence[int], device: torch.device) -> GroupLayout:
        """The layout of rows that follow the prefixes `row_groups` (indices into `prefix_lengths`, the cache's).

        R is one of the groups' row counts: the one with the fewest slots plus slot groups (a group
        of c rows takes ceil(c / R) slot groups, its spare slots and prefix copies both cost work),
        so requests of equal document counts fill their slots exactly, and one with twice as many
        takes two slot groups instead of doubling everyone's."""
        members: dict[int, list[int]] = {}
        for row, g in enumerate(row_groups):
            members.setdefault(g, []).append(row)
        counts = [len(m) for m in members.values()]
        per_group = min(sorted(set(counts), reverse=True), key=lambda r: sum(-(-c // r) * (r + 1) for c in counts))  # ties: fewer copies
        prefixes: list[int] = []
        slots: list[int] = []
        place = [0] * len(row_groups)
        for g in sorted(members):
            for i in range(0, len(members[g]), per_group):
                chunk = members[g][i : i + per_group]
                for j, row in enumerate(chunk):
                    place[row] = len(slots) + j
                prefixes.append(g)
                slots += chunk + chunk[:1] * (per_group - len(chunk))  # spare slots repeat a row
        as_tensor = partial(torch.tensor, dtype=torch.long, device=device)
        in_order = slots == list(range(len(row_groups)))
        lengths = tuple(prefix_lengths[g] for g in prefixes)
        return cls(
            None if prefixes == list(range(len(prefix_lengths))) else as_tensor(prefixes),
            None if in_order else as_tensor(slots),
            None if in_order else as_tensor(place),
            per_group,
            lengths,
            None if min(lengths) == max(lengths) else torch.arange(max(lengths), device=device) < as_tensor(lengths)[:, None],
        )

    def to_slots(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.slots is None else x.index_select(0, self.slots)

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.place is None else x.index_select(0, self.place)


class _PrefixLayer(DynamicLayer):
    """One layer's prefix keys/values, (G, Hkv, P, D): every group of the prefix pass, right-padded.
    `update` hands back the new tokens' states alone: the attention function reads the prefixes from here."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return key_states, value_states


class SharedPrefixCache(DynamicCache):
    """The prefixes' key/value cache as the decoder sees it for the rows that follow them."""

    def __init__(self, prefix: DynamicCache, config, layout: GroupLayout):
        super().__init__(config=config)
        self.layers = [_PrefixLayer(layer.keys, layer.values) for layer in prefix.layers]
        self.layout = layout


def cache_of_prefixes(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], config) -> DynamicCache:
    """A cache of prefixes from each layer's (keys, values), (G, Hkv, P, D), as a prefix pass returns it."""
    cache = DynamicCache(config=config)
    cache.layers = [_PrefixLayer(keys, values) for keys, values in layers]
    return cache


QUERY_CHUNK = 1024  # queries per step: bounds the fp32 score block to B x H x 1024 x (P + S)


def prefix_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, shared_prefix=None, **kwargs):
    """query (B, H, S, D); key/value (B, Hkv, S, D) of the rows' own tokens; the prefixes'
    (G, Hkv, P, D) from `shared_prefix`, right-padded, which one each row follows and its length
    in its layout. `attention_mask` (B, 1, S, P + S), True = attend: its prefix part is each
    row's own prefix (the layout's lengths say the same), its own part is causal with the rows'
    right padding. The prefix product runs as one matmul per slot group and kv head over the
    group's queries, so a prefix is never broadcast (copied) to its rows; long rows run in
    chunks of queries (each softmax is per query: exact). Scores are rounded to the inputs'
    dtype before the fp32 softmax, as transformers' eager attention does."""
    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layout: GroupLayout = shared_prefix.layout
    layer = shared_prefix.layers[module.layer_idx]
    pk, pv = layer.keys, layer.values
    if layout.groups is not None:
        pk, pv = pk.index_select(0, layout.groups), pv.index_select(0, layout.groups)
    s, d = query.shape[-2:]
    width = pk.shape[-2]  # the cache's: the mask's own part starts there
    p = max(layout.lengths)  # what these groups' prefixes hold: no work on padding past the longest
    pk, pv = pk[:, :, :p], pv[:, :, :p]
    scale = scaling if scaling is not None else d**-0.5
    query, key, value = layout.to_slots(query), layout.to_slots(key), layout.to_slots(value)
    if attention_mask is None:  # no padding: causal over the rows' own tokens
        own_allowed = torch.ones((s, s), dtype=torch.bool, device=query.device).tril()[None, None].expand(query.shape[0], 1, s, s)
    else:
        own_allowed = layout.to_slots(attention_mask[..., width:]).bool()
    chunks = [
        _attend(query[:, :, i : i + QUERY_CHUNK], key[:, :, : i + QUERY_CHUNK], value[:, :, : i + QUERY_CHUNK], pk, pv,
                own_allowed[:, :, i : i + QUERY_CHUNK, : i + QUERY_CHUNK], layout.allowed, scale)
        for i in range(0, s, QUERY_CHUNK)
    ]  # fmt: skip
    out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)
    return layout.to_rows(out).transpose(1, 2).contiguous(), None


# Softmax exponents are clamped here before `exp`: at -inf (masked scores) or below about -87
# (past fp32's normal range) the CPU's vectorised exp takes a slow path, ~12x slower a call
# (measured on the own part's causal block); exp(-80) is 1.8e-35 of the row's largest term, so
# no allowed score changes, and masked ones are zeroed after.
EXP_FLOOR = -80.0


def _attend(query, key, value, pk, pv, own_allowed, prefix_allowed, scale):
    """One block of queries (Gp * R, H, S, D), R slots per group, over each group's prefix
    (Gp, Hkv, P, D) and the rows' own keys (Gp * R, Hkv, K, D) up to the block's end; returns
    (Gp * R, H, S, D). `prefix_allowed` (Gp, P) or None: every prefix token.

    Two layouts: the prefix part runs by group, (Gp * Hkv, R*G*S, ·), one matmul per prefix; the
    own part in the rows' natural layout, (B, Hkv, G*S, ·), where its matmuls are contiguous.
    Only the per-query maxima and denominators, (·, 1) each, move between them."""
    b, h, s, d = query.shape
    gp, kv, p, _ = pk.shape
    r = b // gp
    g = h // kv  # head h uses kv head h // g, as repeat_kv
    k_own = key.shape[2]
    q = query.reshape(b, kv, g * s, d)

    def natural(x: torch.Tensor) -> torch.Tensor:  # (Gp * Hkv, R*G*S, 1) -> (B, Hkv, G*S, 1)
        return x.view(gp, kv, r, g * s, 1).transpose(1, 2).reshape(b, kv, g * s, 1)

    def by_group(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, G*S, n) -> (Gp * Hkv, R*G*S, n)
        return x.view(gp, r, kv, g * s, x.shape[-1]).transpose(1, 2).reshape(gp * kv, r * g * s, x.shape[-1])

    to_prefix = torch.bmm(by_group(q), pk.reshape(gp * kv, p, d).transpose(-1, -2)).float().mul_(scale)  # (Gp * Hkv, R*G*S, P)
    prefix_blocked = None if prefix_allowed is None else ~prefix_allowed[:, None, None]
    if prefix_blocked is not None:
        to_prefix.view(gp, kv, r * g * s, p).masked_fill_(prefix_blocked, float("-inf"))
    allowed = own_allowed.expand(b, 1, s, k_own).unsqueeze(2).expand(b, 1, g, s, k_own).reshape(b, 1, g * s, k_own)
    to_own = (q @ key.transpose(-1, -2)).float().mul_(scale).masked_fill_(~allowed, float("-inf"))  # (B, Hkv, G*S, K)
    # One softmax over both parts: shared maximum, shared denominator.
    top = torch.maximum(natural(to_prefix.amax(-1, keepdim=True)), to_own.amax(-1, keepdim=True))
    e_prefix = to_prefix.sub_(by_group(top)).clamp_(min=EXP_FLOOR).exp_()
    if prefix_blocked is not None:
        e_prefix.view(gp, kv, r * g * s, p).masked_fill_(prefix_blocked, 0.0)
    e_own = to_own.sub_(top).clamp_(min=EXP_FLOOR).exp_().mul_(allowed)
    denom = natural(e_prefix.sum(-1, keepdim=True)) + e_own.sum(-1, keepdim=True)
    out_prefix = torch.bmm(e_prefix.div_(by_group(denom)).to(value.dtype), pv.reshape(gp * kv, p, d))  # (Gp * Hkv, R*G*S, D)
    out = (e_own.div_(denom).to(value.dtype) @ value).view(gp, r, kv, g * s, d)  # (B, Hkv, G*S, D), by slot group
    return out.add_(out_prefix.view(gp, kv, r, g * s, d).transpose(1, 2)).view(b, h, s, d)


AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)


def use_prefix_attention(text_config) -> None:
    """Route the decoder's attention through `prefix_attention` (stock sdpa unless a call passes a prefix)."""
    text_config._attn_implementation = PREFIX_ATTENTION
