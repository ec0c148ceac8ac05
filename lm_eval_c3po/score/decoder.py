"""The model's own decoder layers, run by hand over packed rows and trie nodes.

Tries and packed prefixes need attention patterns that a plain forward cannot
express: each packed sequence attends only within itself, each trie node to
its prefix and its own ancestors. These helpers run the model's decoder
layers, rotary embedding and :class:`~transformers.DynamicCache` over such
rows with a directly built 4-D mask (SDPA or eager attention).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache

KV = tuple[torch.Tensor, torch.Tensor]


def run_layers(model, hidden: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache | None,
            first: int, last: int) -> torch.Tensor:
    """Decoder layers ``first..last-1`` over packed rows with a prepared 4-D mask (keys/values into ``cache``)."""
    position_embeddings = model.model.rotary_emb(hidden, position_ids)
    for layer in model.model.layers[first:last]:
        hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, **{_cache_keyword(type(layer)): cache},
                       use_cache=cache is not None, position_embeddings=position_embeddings)
    return hidden


@functools.cache
def _cache_keyword(layer_class: type) -> str:
    """The decoder layer's key/value cache argument: ``cache`` in recent transformers 5.x, where
    ``past_key_values`` is deprecated (removal announced for 5.40), ``past_key_values`` in earlier ones."""
    return "cache" if "cache" in inspect.signature(layer_class.forward).parameters else "past_key_values"


def run_after_prefix(model, hidden: torch.Tensor, prefix_kv: list[KV], prefix_len: torch.Tensor, depth: torch.Tensor,
                visible: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """Decoder layers ``first..last-1`` over trie nodes ``hidden [N, W, H]`` after left-padded prefixes.

    ``prefix_kv[j]`` are layer ``first + j``'s keys/values ``[N, heads, P, dim]``
    with row n's ``prefix_len[n]`` real positions at the right end. Node w of
    row n sits at position ``prefix_len[n] + depth[n, w]`` (so rotary phases
    match the unsplit row) and attends to the prefix and to the nodes
    ``visible[n, w]``.
    """
    if first == last:
        return hidden
    device = hidden.device
    pad = prefix_kv[0][0].shape[2]
    prefix_len = prefix_len.to(device)
    cache = DynamicCache(ddp_cache_data=[(None, None)] * first + list(prefix_kv))
    prefix_valid = torch.arange(pad, device=device).unsqueeze(0) >= (pad - prefix_len).unsqueeze(1)
    mask = tree_mask(model.config, prefix_valid, visible.to(device), hidden.dtype)
    return run_layers(model, hidden, mask, prefix_len.unsqueeze(1) + depth.to(device), cache, first, last)


def tree_mask(config, prefix_valid: torch.Tensor, visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 4-D attention mask ``[N, 1, W, P + W]`` of trie nodes after left-padded prefixes.

    Built directly (transformers takes a 4-D mask as given): its mask factory
    would evaluate a custom pattern element by element under vmap, which costs
    more than the layers it masks for these short rows. Boolean for SDPA,
    additive for eager attention, as transformers' own mask functions give them.
    """
    rows, width = visible.shape[:2]
    mask = torch.cat([prefix_valid.unsqueeze(1).expand(rows, width, -1), visible], dim=2).unsqueeze(1)
    if config._attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def causal_segment(position_ids: torch.Tensor, visible: torch.Tensor, start: int, size: int) -> None:
    """Lay one causal sequence at ``start`` of a packed row: positions from 0, attending only within itself."""
    position_ids[start:start + size] = torch.arange(size)
    visible[start:start + size, start:start + size] = torch.ones(size, size, dtype=torch.bool).tril()


def prefix_kv_after(model, hidden: torch.Tensor, spans: list[tuple[int, int, int, int]], first: int
                     ) -> dict[int, list[KV]]:
    """Keys/values of layers ``first..`` over prefix tokens only, from ``hidden`` entering ``first``.

    ``spans`` are ``(prefix, row, start, size)`` in ``hidden``'s packed rows;
    the trie nodes between them are dropped, so these layers cost the prefix
    tokens alone. Loss calls attend to what this keeps.
    """
    inner = model.model
    device = hidden.device
    by_row: dict[int, list[tuple[int, int, int]]] = {}
    for n, row, start, size in spans:
        by_row.setdefault(row, []).append((n, start, size))
    width = max(sum(size for _, _, size in members) for members in by_row.values())
    take = torch.zeros(len(by_row), width, dtype=torch.long)  # source position in hidden's row
    position_ids = torch.zeros(len(by_row), width, dtype=torch.long)
    visible = torch.eye(width, dtype=torch.bool).repeat(len(by_row), 1, 1)
    placed = []
    for r, members in enumerate(by_row.values()):
        at = 0
        for n, start, size in members:
            take[r, at:at + size] = torch.arange(start, start + size)
            causal_segment(position_ids[r], visible[r], at, size)
            placed.append((n, r, at, size))
            at += size
    source = torch.tensor(list(by_row)).unsqueeze(1).expand_as(take)
    mask = tree_mask(model.config, torch.ones(len(by_row), 0, dtype=torch.bool), visible, inner.dtype)
    cache = DynamicCache(ddp_cache_data=[(None, None)] * len(inner.layers))
    run_layers(model, hidden[source.to(device), take.to(device)], mask.to(device), position_ids.to(device), cache,
            first, len(inner.layers))
    return {n: [(cache.layers[j].keys[r:r + 1, :, at:at + size].clone(),
                 cache.layers[j].values[r:r + 1, :, at:at + size].clone()) for j in range(first, len(inner.layers))]
            for n, r, at, size in placed}


def empty_kv(model, num_layers: int, device) -> list[KV]:
    """Zero-length keys/values per layer for a row whose first token is overridden (shapes from a 1-token pass)."""
    cache = model.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True).past_key_values
    return [(cache.layers[j].keys[:, :, :0].clone(), cache.layers[j].values[:, :, :0].clone())
            for j in range(num_layers)]


def left_pad(tensors: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Stack ``[1, heads, p_n, dim]`` tensors into ``[N, heads, width, dim]``, each right-aligned."""
    first = tensors[0]
    out = first.new_zeros(len(tensors), first.shape[1], width, first.shape[3])
    for n, t in enumerate(tensors):
        if t.shape[2]:
            out[n, :, width - t.shape[2]:] = t[0]
    return out
