"""Cascade attention over shared prefixes equals plain attention over each row's concatenated keys,
with grouped-query heads, right padding, in query chunks, and with rows of several prefixes
(of different lengths) mixed in one batch."""

import pytest
import torch

import engine.prefix_attention as pa


class _Layer:
    def __init__(self, keys, values):
        self.keys, self.values = keys, values


class _Cache:
    def __init__(self, keys, values, row_groups, lengths=None):
        self.layers = [_Layer(keys, values)]
        self.layout = pa.GroupLayout.of(row_groups, lengths or [keys.shape[-2]] * keys.shape[0], keys.device)


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
    got, _ = pa.prefix_attention(_Module(), q, k, v, mask, shared_prefix=_Cache(pk, pv, [0] * b))
    keys = torch.cat([pk.expand(b, -1, -1, -1), k], 2).repeat_interleave(h // kv, 1)
    values = torch.cat([pv.expand(b, -1, -1, -1), v], 2).repeat_interleave(h // kv, 1)
    scores = (q @ keys.transpose(-1, -2)) * d**-0.5
    want = (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ values).transpose(1, 2)
    assert got.shape == (b, s, h, d)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("chunk", [1024, 5])
@pytest.mark.parametrize("row_groups", [[2, 0, 2, 1, 0], [0, 0, 1, 1], [1, 1, 0], [2, 1, 2], [1, 0, 1, 1, 2, 1, 1]])
def test_rows_of_several_prefixes_attend_each_to_its_own(monkeypatch, chunk, row_groups):
    """Prefixes of lengths 11, 6 and 9 right-padded to 11 in one cache; rows in any order, groups
    with unequal row counts (spare slots, or a group over several slot groups) or absent from the
    batch (the longest one too)."""
    monkeypatch.setattr(pa, "QUERY_CHUNK", chunk)
    torch.manual_seed(2)
    b, h, kv, s, d, p = len(row_groups), 4, 2, 23, 8, 11
    lengths = [11, 6, 9]
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, kv, s, d), torch.randn(b, kv, s, d)
    pk, pv = torch.randn(3, kv, p, d), torch.randn(3, kv, p, d)
    own = torch.ones(s, s).tril().bool()
    mask = torch.zeros(b, 1, s, p + s, dtype=torch.bool)
    for i, g in enumerate(row_groups):
        mask[i, :, :, : lengths[g]] = True
        mask[i, :, :, p:] = own
    mask[0, ..., p + 17 :] = False  # row 0 is right-padded after 17 tokens
    got, _ = pa.prefix_attention(_Module(), q, k, v, mask, shared_prefix=_Cache(pk, pv, row_groups, lengths))
    assert got.shape == (b, s, h, d)
    for i, g in enumerate(row_groups):
        n = lengths[g]
        keys = torch.cat([pk[g, :, :n], k[i]], 1).repeat_interleave(h // kv, 0)
        values = torch.cat([pv[g, :, :n], v[i]], 1).repeat_interleave(h // kv, 0)
        allowed = torch.cat([mask[i, 0, :, :n], mask[i, 0, :, p:]], -1)
        scores = (q[i] @ keys.transpose(-1, -2)) * d**-0.5
        want = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ values).transpose(0, 1)
        assert (got[i] - want).abs().max().item() <= 1e-5, f"row {i} (prefix {g})"


def test_the_layout_leaves_rows_in_place_when_they_are_in_group_order():
    cpu = torch.device("cpu")
    same = pa.GroupLayout.of([0, 0, 1, 1], [5, 7], cpu)
    assert same.groups is None and same.slots is None and same.per_group == 2 and same.lengths == (5, 7)
    mixed = pa.GroupLayout.of([1, 0, 1], [5, 7, 9], cpu)
    assert mixed.groups.tolist() == [0, 1] and mixed.lengths == (5, 7)  # group 2 is absent
    assert mixed.slots.tolist() == [1, 1, 0, 2]  # group 0's spare slot repeats its row
    assert mixed.place.tolist() == [2, 0, 3]


def test_a_group_with_more_rows_takes_several_slot_groups():
    """Two rows per group, but group 1 has four: it takes two slot groups (its prefix twice),
    rather than every group four slots."""
    layout = pa.GroupLayout.of([0, 0, 1, 1, 1, 1, 2, 2], [5, 7, 9], torch.device("cpu"))
    assert layout.per_group == 2 and layout.groups.tolist() == [0, 1, 1, 2] and layout.lengths == (5, 7, 7, 9)
    assert layout.slots is None  # the rows fill their slots exactly, in order


def test_without_a_prefix_it_is_stock_sdpa():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)

    class Causal:
        is_causal = True
        num_key_value_groups = 1

    got, _ = pa.prefix_attention(Causal(), q, k, v, None)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert (got - want).abs().max().item() <= 1e-6
