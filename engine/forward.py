"""Phase two: score prepared requests on the device. Raises no input errors (prepare did that).

For a batch of `PreparedRequest`s:
1. the vision tower runs once over every image/video no cache had (attention stays within each);
2. rows are grouped by shared prefix (requests with the same prefix tokens and query visuals
   join one group); each group's prefix runs through the decoder once, and micro-batches of the
   rows' remaining tokens attend to its key/value cache, read once per layer and never copied
   per row (`engine.prefix_attention`); their multimodal rotary positions continue from the
   prefix (they were computed on the whole pair in prepare);
3. rows with no shared prefix run whole, in length-sorted micro-batches;
4. score = sigmoid(logit("yes") - logit("no")) at each row's last token, in fp32.

A micro-batch stays within `max_batch_tokens`, counting a group's prefix once:
prefix + rows x longest remainder.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from engine.features import FeatureSpec, ImageFeatures
from engine.prefix_attention import GroupLayout, SharedPrefixCache, use_prefix_attention
from engine.prepare import PreparedRequest, PreparedRow
from engine.vision import PixelPatches
from engine.vision_tower import VisionTower


@dataclass
class RequestScores:
    scores: list[float]
    new_features: list[ImageFeatures]  # images (not videos) this batch encoded, for the feature cache
    tokens: int  # tokens the decoder ran for this request (its shared prefix once)
    batch_requests: int = 1  # requests scored in the same device call as this one


@dataclass
class _Group:
    prefix: PreparedRow | None  # None: rows run whole
    shared: int
    shared_visuals: int
    members: list[tuple[int, int]] = field(default_factory=list)  # (request, row)


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
        use_prefix_attention(self.core.language_model.config)

    # ---- public -------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, requests: Sequence[PreparedRequest]) -> list[RequestScores]:
        with self.lock:
            features, new = self._vision(requests)
            scores: list[list[float]] = [[0.0] * len(r.rows) for r in requests]
            for group in self._groups(requests):
                self._score_group(group, requests, features, scores)
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

    def _groups(self, requests: Sequence[PreparedRequest]) -> list[_Group]:
        whole = _Group(None, 0, 0)
        shared: dict[tuple, _Group] = {}
        for i, r in enumerate(requests):
            if not r.shared:
                whole.members += [(i, j) for j in range(len(r.rows))]
                continue
            first = r.rows[0]
            key = (first.ids[: r.shared].numpy().tobytes(), first.visuals[: r.shared_visuals])
            if key not in shared:
                prefix = PreparedRow(first.ids[: r.shared], first.positions[:, : r.shared], first.visuals[: r.shared_visuals], first.kinds[: r.shared_visuals])
                shared[key] = _Group(prefix, r.shared, r.shared_visuals)
            shared[key].members += [(i, j) for j in range(len(r.rows))]
        return [g for g in (whole, *shared.values()) if g.members]

    def _score_group(self, group: _Group, requests, features, scores) -> None:
        rows = {m: requests[m[0]].rows[m[1]] for m in group.members}
        cache = None
        if group.prefix is not None:
            _, cache = self._decode([group.prefix], 0, 0, None, features, keep_cache=True)
        order = sorted(group.members, key=lambda m: len(rows[m]))
        batch: list[tuple[int, int]] = []
        for m in [*order, None]:
            if m is None or (batch and group.shared + (len(batch) + 1) * (len(rows[m]) - group.shared) > self.max_batch_tokens):
                if batch:
                    hidden, _ = self._decode([rows[b] for b in batch], group.shared, group.shared_visuals, cache, features)
                    for b, s in zip(batch, self._yes_no(hidden)):
                        scores[b[0]][b[1]] = s
                batch = []
            if m is not None:
                batch.append(m)

    def _decode(self, rows: Sequence[PreparedRow], start: int, skip_visuals: int, prefix_cache: DynamicCache | None,
                features: dict[str, ImageFeatures], keep_cache: bool = False) -> tuple[torch.Tensor, DynamicCache | None]:  # fmt: skip
        """Decoder over rows[i][start:], after `prefix_cache` (the first `start` tokens, shared);
        returns each row's last hidden state (and the cache when `keep_cache`). Rows are right-padded:
        the padding sits after every real token, so no real token attends to it."""
        n = len(rows)
        lengths = [len(r) - start for r in rows]
        width = max(lengths)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        positions = torch.ones((3, n, width), dtype=torch.long)
        mask = torch.zeros((n, start + width), dtype=torch.long)
        mask[:, :start] = 1
        for i, (r, length) in enumerate(zip(rows, lengths)):
            ids[i, :length] = r.ids[start:]
            positions[:, i, :length] = r.positions[:, start:]
            mask[i, start : start + length] = 1
        ids, positions, mask = ids.to(self.device), positions.to(self.device), mask.to(self.device)
        embeds = self.core.get_input_embeddings()(ids)
        visuals = [features[k] for r in rows for k in r.visuals[skip_visuals:]]
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
        if prefix_cache is not None:
            cache = SharedPrefixCache(prefix_cache, config, GroupLayout.of([0] * n, [start], self.device))  # one prefix, every row
            lm_kwargs["shared_prefix"] = cache
        else:
            cache = DynamicCache(config=config) if keep_cache else None
        out = self.core.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=cache is not None, **lm_kwargs
        )
        last = torch.tensor(lengths, device=self.device) - 1
        hidden = out.last_hidden_state[torch.arange(n, device=self.device), last]
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
