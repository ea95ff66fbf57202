"""Cascade attention over a shared prefix equals plain attention over the concatenated keys, with
grouped-query heads, right padding, and in query chunks."""

import pytest
import torch

import engine.prefix_attention as pa


class _Layer:
    def __init__(self, keys, values):
        self.keys, self.values = keys, values


class _Cache:
    def __init__(self, keys, values):
        self.layers = [_Layer(keys, values)]


class _Module:
    layer_idx = 0


@pytest.mark.parametrize("chunk", [1024, 5, 1])
def test_cascade_attention_equals_attention_over_the_concatenation(monkeypatch, chunk):
    monkeypatch.setattr(pa, "QUERY_CHUNK", chunk)
    torch.manual_seed(0)
    b, h, kv, s, d, p = 3, 4, 2, 37, 8, 11
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, kv, s, d), torch.randn(b, kv, s, d)
    pk, pv = torch.randn(1, kv, p, d), torch.randn(1, kv, p, d)
    mask = torch.ones(b, 1, s, p + s, dtype=torch.bool)
    mask[..., p:] = torch.ones(s, s).tril().bool()
    mask[1, ..., p + 30 :] = False  # row 1 is right-padded after 30 tokens
    got, _ = pa.prefix_attention(_Module(), q, k, v, mask, shared_prefix=_Cache(pk, pv))
    keys = torch.cat([pk.expand(b, -1, -1, -1), k], 2).repeat_interleave(h // kv, 1)
    values = torch.cat([pv.expand(b, -1, -1, -1), v], 2).repeat_interleave(h // kv, 1)
    scores = (q @ keys.transpose(-1, -2)) * d**-0.5
    want = (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ values).transpose(1, 2)
    assert got.shape == (b, s, h, d)
    assert (got - want).abs().max().item() <= 1e-5


def test_without_a_prefix_it_is_stock_sdpa():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)

    class Causal:
        is_causal = True
        num_key_value_groups = 1

    got, _ = pa.prefix_attention(Causal(), q, k, v, None)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert (got - want).abs().max().item() <= 1e-6
