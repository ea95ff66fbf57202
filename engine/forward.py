"""Phase two: score prepared requests on the device. Raises no input errors (prepare did that).

For a batch of `PreparedRequest`s:
1. the vision tower runs once over every image/video no cache had (attention stays within each);
2. rows are grouped by shared prefix (requests with the same prefix tokens and query visuals
   join one group); the groups' prefixes run through the decoder together, right-padded, in one
   call (more only past the token budget, or where one prefix would pad the others too much),
   and micro-batches of the rows' remaining tokens, mixing groups, attend each to its own group's
   key/value cache, read once per layer and never copied per row (`engine.prefix_attention`);
   their multimodal rotary positions continue from the prefix (they were computed on the whole
   pair in prepare). Many requests with different queries thus take two decoder calls, not two
   per request (per-call overhead dominated small models). The head every request with the same
   instruction shares (system turn, instruction: `PreparedRequest.common`) is not run again: its
   keys and values are kept between batches (`KEPT_HEADS`, as vLLM's prefix caching keeps a
   system prompt's), and the prefix pass runs only the rest of each prefix, after it;
3. rows with no shared prefix run whole, in length-sorted micro-batches;
4. score = sigmoid(logit("yes") - logit("no")) at each row's last token, in fp32; the last decoder
   layer runs its feed-forward for that token only (`engine.scored_token`).

A micro-batch stays within `max_batch_tokens`, counting each group's prefix once:
the groups' prefixes + rows x longest remainder; a batch of prefixes, prefixes x longest.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache

from engine.features import FeatureSpec, ImageFeatures
from engine.prefix_attention import GroupLayout, SharedPrefixCache, cache_of_prefixes, use_prefix_attention
from engine.prepare import PreparedRequest, PreparedRow
from engine.scored_token import ScoredTokenLayer
from engine.vision import PixelPatches
from engine.vision_tower import VisionTower


@dataclass
class RequestScores:
    scores: list[float]
    new_features: list[ImageFeatures]  # images (not videos) this batch encoded, for the feature cache
    tokens: int  # tokens the decoder ran for this request (its shared prefix once)
    batch_requests: int = 1  # requests scored in the same device call as this one


class _Part(NamedTuple):
    """What one decoder call runs of a row: its tokens from `start` on, after the prefix `group`."""

    row: PreparedRow
    start: int = 0  # tokens before it (the group's prefix, run apart)
    skip: int = 0  # visuals inside those tokens
    group: int = -1  # its prefix in the prefix pass (-1: none)
    member: tuple[int, int] = (-1, -1)  # (request, row) whose score it gives

    @property
    def length(self) -> int:
        return len(self.row) - self.start


@dataclass
class _Group:
    prefix: PreparedRow  # the tokens every row of its requests shares
    shared_visuals: int
    common: int = 0  # the prefix's leading tokens that are a kept head (`Forward._head`; 0: none)
    members: list[tuple[int, int]] = field(default_factory=list)  # (request, row)

    @property
    def shared(self) -> int:
        return len(self.prefix)

    @property
    def head_key(self) -> bytes:
        """What the kept head's keys and values depend on: its tokens and their positions."""
        if not self.common:
            return b""
        return self.prefix.ids[: self.common].numpy().tobytes() + self.prefix.positions[:, : self.common].numpy().tobytes()


KEPT_HEADS = 8  # instruction heads whose keys/values stay on the device (a few MB each for an 8B model)


class Forward:
    """The device side of the engine: vision tower and decoder under one lock."""

    def __init__(self, model, tower: VisionTower, *, device: torch.device, feature_spec: FeatureSpec, yes_id: int, no_id: int,
                 pad_id: int, image_token_id: int, video_token_id: int, max_batch_tokens: int):  # fmt: skip
        self.model = model
        self.core = model.model
        self.tower = tower
        self.vision_dtype = tower.dtype
        self.device = device
        self.feature_spec = feature_spec
        self.yes_id, self.no_id, self.pad_id = yes_id, no_id, pad_id
        self.image_token_id, self.video_token_id = image_token_id, video_token_id
        self.max_batch_tokens = max_batch_tokens
        self.lock = threading.Lock()  # torch modules are not re-entrant
        self._heads: OrderedDict[bytes, DynamicCache] = OrderedDict()  # head_key -> its keys/values, least recent first
        use_prefix_attention(self.core.language_model.config)
        deepstack = getattr(getattr(model.config, "vision_config", None), "deepstack_visual_indexes", None) or ()
        self.scored_token = ScoredTokenLayer.wrap_last(self.core.language_model, len(deepstack))

    # ---- public -------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, requests: Sequence[PreparedRequest]) -> list[RequestScores]:
        with self.lock:
            features, new = self._vision(requests)
            scores: list[list[float]] = [[0.0] * len(r.rows) for r in requests]
            whole, groups = self._groups(requests)
            self._score_parts(whole, [], None, features, scores)
            by_head: dict[bytes, list[_Group]] = {}
            for g in groups:
                by_head.setdefault(g.head_key, []).append(g)
            for batch in (b for same in by_head.values() for b in _micro_batches(same, lambda g: g.shared, self.max_batch_tokens, bounded_padding=True)):
                cache = self._prefixes(batch, features)
                parts = [_Part(requests[i].rows[j], g.shared, g.shared_visuals, k, (i, j)) for k, g in enumerate(batch) for i, j in g.members]  # fmt: skip
                self._score_parts(parts, batch, cache, features, scores)
        return [
            RequestScores(s, [new[k] for k in r.digests if k in new], sum(len(row) - r.shared for row in r.rows) + r.shared, len(requests))
            for s, r in zip(scores, requests)
        ]

    # ---- vision -------------------------------------------------------------------------------

    def _vision(self, requests: Sequence[PreparedRequest]) -> tuple[dict[str, ImageFeatures], dict[str, ImageFeatures]]:
        """Every visual's features by key: known ones, plus the new ones computed now (each once)."""
        known: dict[str, ImageFeatures] = {}
        todo: dict[str, tuple[PixelPatches, str]] = {}
        for r in requests:
            known.update(r.features)
        for r in requests:
            for key, p in r.patches.items():
                if key not in known and key not in todo:
                    todo[key] = (p, r.digests.get(key, key))
        keys = list(todo)
        computed = self.tower.features([todo[k][0] for k in keys], [todo[k][1] for k in keys], self.feature_spec)
        new = dict(zip(keys, computed))
        return {**known, **new}, new

    # ---- decoder ------------------------------------------------------------------------------

    def _groups(self, requests: Sequence[PreparedRequest]) -> tuple[list[_Part], list[_Group]]:
        """Rows that run whole, and the groups of rows that share a prefix (same tokens, same
        visuals). A request with no shared prefix but a kept head has its rows follow the head."""
        whole: list[_Part] = []
        shared: dict[tuple, _Group] = {}
        for i, r in enumerate(requests):
            if not r.shared and not r.common:
                whole += [_Part(row, member=(i, j)) for j, row in enumerate(r.rows)]
                continue
            first = r.rows[0]
            n, visuals = (r.shared, r.shared_visuals) if r.shared else (r.common, 0)
            key = (first.ids[:n].numpy().tobytes(), first.visuals[:visuals], r.common)
            if key not in shared:
                prefix = PreparedRow(first.ids[:n], first.positions[:, :n], first.visuals[:visuals], first.kinds[:visuals])
                shared[key] = _Group(prefix, visuals, r.common)
            shared[key].members += [(i, j) for j in range(len(r.rows))]
        return whole, list(shared.values())

    def _prefixes(self, batch: Sequence[_Group], features: dict[str, ImageFeatures]) -> DynamicCache:
        """The keys and values of each group's prefix, right-padded, in `batch` order, from one
        decoder call. Groups with a kept head (all of `batch` or none) run only what follows it,
        continuing a cache that starts with a copy of the head per group: stock attention over
        [head, own tokens], as for any cache (a long query keeps sdpa's kernel)."""
        common = batch[0].common
        if not common:
            return self._decode([_Part(g.prefix) for g in batch], features, keep_cache=True)[1]
        config = self.core.language_model.config
        head = self._head(batch[0], features)
        n = len(batch)
        rest = [k for k, g in enumerate(batch) if g.shared > common]
        if not rest:
            return cache_of_prefixes([(h.keys.expand(n, -1, -1, -1), h.values.expand(n, -1, -1, -1)) for h in head.layers], config)
        cache = DynamicCache(config=config)
        for i, h in enumerate(head.layers):
            cache.update(h.keys.expand(len(rest), -1, -1, -1), h.values.expand(len(rest), -1, -1, -1), i)
        self._decode([_Part(batch[k].prefix, common, 0) for k in rest], features, cache, keep_cache=True)  # extends `cache`
        if len(rest) == n:
            return cache
        # Groups that are the head alone: the head, then padding (their length masks it).
        index = torch.tensor(rest, device=self.device)
        layers = []
        for h, layer in zip(head.layers, cache.layers):
            full = [states.new_zeros((n, *states.shape[1:])).index_copy_(0, index, states) for states in (layer.keys, layer.values)]
            for states, kept in zip(full, (h.keys, h.values)):
                states[:, :, :common] = kept
            layers.append((full[0], full[1]))
        return cache_of_prefixes(layers, config)

    def _head(self, group: _Group, features: dict[str, ImageFeatures]) -> DynamicCache:
        """The kept keys and values of `group`'s head, (1, Hkv, common, D) per layer, computed on first use."""
        key = group.head_key
        cache = self._heads.pop(key, None)
        if cache is None:
            c = group.common
            _, cache = self._decode([_Part(PreparedRow(group.prefix.ids[:c], group.prefix.positions[:, :c], (), ()))], features, keep_cache=True)
        self._heads[key] = cache
        while len(self._heads) > KEPT_HEADS:
            self._heads.popitem(last=False)
        return cache

    def _score_parts(self, parts: list[_Part], groups: Sequence[_Group], cache: DynamicCache | None, features, scores) -> None:
        """Micro-batches of `parts`, each part after its group's prefix in `cache` (several groups
        per micro-batch; `groups` are the cache's, none without one)."""
        prefix = (lambda p: (p.group, groups[p.group].shared)) if groups else None
        for batch in _micro_batches(parts, lambda p: p.length, self.max_batch_tokens, prefix):
            layout = None
            if cache is not None:
                batch.sort(key=lambda p: p.group)  # the layout's order: rows of a group together
                layout = GroupLayout.of([p.group for p in batch], [g.shared for g in groups], self.device)
            hidden, _ = self._decode(batch, features, cache, layout)
            for p, s in zip(batch, self._yes_no(hidden)):
                scores[p.member[0]][p.member[1]] = s

    def _decode(self, parts: Sequence[_Part], features: dict[str, ImageFeatures], prefix_cache: DynamicCache | None = None,
                layout: GroupLayout | None = None, keep_cache: bool = False) -> tuple[torch.Tensor, DynamicCache | None]:  # fmt: skip
        """Decoder over each part's tokens, after its group's prefix in `prefix_cache` (laid out by
        `layout`; without a layout, one prefix per part, and the parts' keys and values are added
        to `prefix_cache`); returns each part's last hidden state (and the cache when `keep_cache`).

        Parts are right-padded: the padding sits after every real token, so causal attention alone
        keeps it from every real token, and without a prefix no mask is passed (it would change
        nothing: sdpa takes its causal path, as for a row alone). A padded prefix's keys and values
        past its length are the padding's: the rows after it never see them (the mask's prefix part
        is each row's own prefix, as the layout's lengths are)."""
        n = len(parts)
        lengths = [p.length for p in parts]
        past = prefix_cache.get_seq_length() if prefix_cache is not None else 0
        # Built whole rather than row by row (a loop of row assignments, 4 small tensor ops a row,
        # cost 4.2 ms for 128 rows; this, 1.2 ms).
        ids = pad_sequence([p.row.ids[p.start :] for p in parts], batch_first=True, padding_value=self.pad_id)
        width = ids.shape[1]
        starts = torch.tensor([p.start for p in parts])[:, None]
        if any(p.row.visuals for p in parts):
            positions = pad_sequence([p.row.positions[:, p.start :].T for p in parts], batch_first=True, padding_value=1).permute(2, 0, 1).contiguous()
        else:  # text pairs: every rotary section is the plain position (prepare's `_row`); the padding's are never seen
            positions = (starts + torch.arange(width)).expand(3, -1, -1)
        mask = None
        if prefix_cache is not None:  # each row sees its own prefix (`start` tokens) and its own tokens after the cache's `past`
            columns = torch.arange(past + width)
            mask = ((columns < starts) | ((columns >= past) & (columns < torch.tensor(lengths)[:, None] + past))).long()
        ids, positions = ids.to(self.device), positions.to(self.device)
        embeds = self.core.get_input_embeddings()(ids)
        visuals = [features[k] for p in parts for k in p.row.visuals[p.skip :]]
        lm_kwargs: dict = {}
        if visuals:
            vis_mask = (ids == self.image_token_id) | (ids == self.video_token_id)
            flat = torch.cat([v.embeds for v in visuals]).to(embeds.device, embeds.dtype)
            if int(vis_mask.sum()) != flat.shape[0]:
                raise RuntimeError(f"{int(vis_mask.sum())} visual tokens but {flat.shape[0]} features")
            embeds = embeds.masked_scatter(vis_mask.unsqueeze(-1), flat)
            if visuals[0].deepstack:
                lm_kwargs["visual_pos_masks"] = vis_mask
                lm_kwargs["deepstack_visual_embeds"] = [
                    torch.cat([v.deepstack[layer] for v in visuals]).to(embeds.device, embeds.dtype) for layer in range(len(visuals[0].deepstack))
                ]
        config = self.core.language_model.config
        if layout is not None:
            cache = SharedPrefixCache(prefix_cache, config, layout)
            lm_kwargs["shared_prefix"] = cache
        elif prefix_cache is not None:
            cache = prefix_cache
        else:
            cache = DynamicCache(config=config) if keep_cache else None
        last = torch.tensor(lengths, device=self.device) - 1
        trim = self.scored_token is not None and not keep_cache  # a scoring pass: only each row's last token goes on
        if trim:
            self.scored_token.positions = last
        try:
            out = self.core.language_model(
                inputs_embeds=embeds, attention_mask=None if mask is None else mask.to(self.device), position_ids=positions,
                past_key_values=cache, use_cache=cache is not None, **lm_kwargs,
            )  # fmt: skip
        finally:
            if trim:
                self.scored_token.positions = None
        hidden = out.last_hidden_state[:, 0] if trim else out.last_hidden_state[torch.arange(n, device=self.device), last]
        return hidden, (out.past_key_values if keep_cache else None)

    def _yes_no(self, last_hidden: torch.Tensor) -> list[float]:
        head = self.model.lm_head
        weight = getattr(head, "weight", None)
        if isinstance(head, torch.nn.Linear) and weight is not None and weight.dtype.is_floating_point:
            rows = weight[[self.yes_id, self.no_id]].float()
            logits = last_hidden.float() @ rows.T
        else:  # a quantized head (only if configured): read its output, then go to fp32
            logits = head(last_hidden)[:, [self.yes_id, self.no_id]].float()
        return torch.sigmoid(logits[:, 0] - logits[:, 1]).tolist()


T = TypeVar("T")
PREFIX_PADDING = 2  # a batch of prefixes runs at most this many times its real tokens (padding included)


def _micro_batches(items: Sequence[T], length: Callable[[T], int], budget: int, prefix: Callable[[T], tuple[Hashable, int]] | None = None,
                   bounded_padding: bool = False) -> list[list[T]]:  # fmt: skip
    """`items` sorted by `length`, in consecutive runs within `budget` tokens: items x the longest
    (the padded batch), plus each distinct prefix's tokens once (`prefix(item)`: its key, tokens).
    `bounded_padding` also ends a run where its padding would outweigh its real tokens
    (`PREFIX_PADDING`): prefixes of very different lengths (one long query among short ones)
    would otherwise pad every short one to the long one."""
    runs: list[list[T]] = []
    run: list[T] = []
    seen: set[Hashable] = set()
    fixed = real = 0
    for item in sorted(items, key=length):
        n = length(item)
        key, tokens = prefix(item) if prefix else (None, 0)
        padded = (len(run) + 1) * n
        extra = 0 if key in seen else tokens
        if run and (fixed + extra + padded > budget or (bounded_padding and padded > PREFIX_PADDING * (real + n))):
            runs.append(run)
            run, seen, fixed, real, extra = [], set(), 0, 0, tokens
        run.append(item)
        seen.add(key)
        fixed, real = fixed + extra, real + n
    return [*runs, run] if run else runs
