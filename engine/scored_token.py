"""The last decoder layer's feed-forward for the scored token only.

A score reads one position of the decoder's output: each row's last token. In the last layer
every token's attention still runs (the stock module computes each token's query with its key
and value, and the keys and values are needed), but what follows attention there (the residual,
the post-attention norm and the MLP, about two thirds of a layer's multiply-adds) is needed at
that one position only. For the tiny model's 4 layers that is about 15 % of a scoring pass; for
the 8B's 36, about 2 %.

`ScoredTokenLayer` wraps the layer's `forward` (an attribute of the instance: the parameters and
their names stay where they are). While `positions` is set, one per row, it runs the stock
attention over every token and the rest at those positions only, returning (rows, 1, hidden);
otherwise it is the stock forward. Only where nothing runs after the last layer but the final
norm: a model whose deepstack visual features reach its last layer keeps it whole.
"""

from __future__ import annotations

import torch


class ScoredTokenLayer:
    def __init__(self, layer: torch.nn.Module):
        self.layer = layer
        self.positions: torch.Tensor | None = None  # (rows,) the scored position of each row, while a scoring pass runs
        self._stock = layer.forward
        layer.forward = self.forward

    @classmethod
    def wrap_last(cls, language_model: torch.nn.Module, deepstack_layers: int) -> ScoredTokenLayer | None:
        """The wrapper of `language_model`'s last layer; None where its deepstack reaches that layer."""
        layers = language_model.layers
        if len(layers) <= deepstack_layers:
            return None
        last = layers[-1]
        if not isinstance(getattr(last.forward, "__self__", None), cls):  # engines made on one loaded model share the wrapper
            cls(last)
        return last.forward.__self__

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.positions is None:
            return self._stock(hidden_states, **kwargs)
        layer = self.layer
        attended, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        scored = (hidden_states + attended)[rows, self.positions].unsqueeze(1)  # the stock residual, at the scored tokens
        return scored + layer.mlp(layer.post_attention_layernorm(scored))
