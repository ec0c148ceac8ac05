"""Preparing examples once (no grad): tries through the first critical layer, prefix keys/values after it."""

from __future__ import annotations

import torch

from lm_eval_c3po.routing import input_device
from lm_eval_c3po.score.decoder import KV, causal_segment, empty_kv, prefix_kv_after, run_layers, tree_mask
from lm_eval_c3po.score.first_layer import FirstCriticalLayer
from lm_eval_c3po.score.packing import chunk_by_cost, pack_first_fit
from lm_eval_c3po.score.prefix_cache import PreparedNeighbour
from lm_eval_c3po.score.tries import Trie


def prepare(model, d0: FirstCriticalLayer, skeletons: list[tuple[list[tuple[int, ...]], list[Trie], list[int]]],
             budget_tokens: int) -> list[PreparedNeighbour]:
    """Prepare examples (no grad): their tries through ``d0`` and their prefixes' keys/values after it.

    ``skeletons[e]`` are example e's prefixes, tries and choice-to-trie map
    (:func:`build_tries`). Each distinct prefix and the tries that continue
    it form one *segment*; segments are packed several to a row
    (:func:`_pack`) and rows run in chunks of at most ``budget_tokens``
    tokens (:func:`_chunks`). A chunk runs the layers up to ``d0`` over whole
    segments (the prefix causally, each trie node on its prefix and its
    ancestors), recording ``d0``'s routing; the layers after ``d0`` then run
    over the prefix tokens only, keeping their keys/values.
    """
    inner = model.model
    device = input_device(model)
    num_layers = len(inner.layers)
    first = d0.decoder
    prefix_id: dict[tuple[int, ...], int] = {}
    attached: list[list[Trie]] = []
    for prefixes, tries, _ in skeletons:
        for trie in tries:
            n = prefix_id.setdefault(prefixes[trie.group], len(prefix_id))
            if n == len(attached):
                attached.append([])
            attached[n].append(trie)
    keys = list(prefix_id)
    prefix_kv: dict[int, list[KV]] = {n: [] for n in range(len(keys))}
    sizes = [len(key) + sum(len(t) for t in tries) for key, tries in zip(keys, attached)]
    rows = pack_first_fit(sizes)
    for chunk in chunk_by_cost([sum(sizes[n] for n in row) for row in rows], budget_tokens):
        packed = [rows[r] for r in chunk]
        width = max(sum(sizes[n] for n in row) for row in packed)
        ids = torch.zeros(len(packed), width, dtype=torch.long)
        position_ids = torch.zeros(len(packed), width, dtype=torch.long)
        visible = torch.eye(width, dtype=torch.bool).repeat(len(packed), 1, 1)
        spans, trie_at = [], []  # (prefix, row, start, size) of non-empty prefixes / (trie, row, start)
        for row, members in enumerate(packed):
            start = 0
            for n in members:
                size = len(keys[n])
                ids[row, start:start + size] = torch.tensor(keys[n], dtype=torch.long)
                causal_segment(position_ids[row], visible[row], start, size)
                if size:
                    spans.append((n, row, start, size))
                at = start + size
                for trie in attached[n]:
                    nodes = slice(at, at + len(trie))
                    ids[row, nodes] = torch.tensor(trie.tokens, dtype=torch.long)
                    position_ids[row, nodes] = size + torch.tensor(trie.depth)
                    visible[row, nodes, start:start + size] = True
                    visible[row, nodes, nodes] = trie.visible
                    trie_at.append((trie, row, at))
                    at += len(trie)
                start = at
        mask = tree_mask(model.config, torch.ones(len(packed), 0, dtype=torch.bool), visible, inner.dtype)
        with d0.recording() as got:
            hidden = run_layers(model, inner.embed_tokens(ids.to(device)), mask.to(device), position_ids.to(device),
                             None, 0, first + 1)
        keep_d0(d0, trie_at, hidden, *(got[name].view(len(packed), width, -1) for name in ("logits", "x", "y")))
        if first + 1 < num_layers and spans:
            prefix_kv.update(prefix_kv_after(model, hidden, spans, first + 1))
    empty = [n for n, key in enumerate(keys) if not key]
    if empty and first + 1 < num_layers:
        kv = empty_kv(model, num_layers, device)[first + 1:]
        for n in empty:
            prefix_kv[n] = kv
    return [PreparedNeighbour([prefix_kv[prefix_id[p]] for p in prefixes], tries, choice_trie)
            for prefixes, tries, choice_trie in skeletons]


def keep_d0(d0: FirstCriticalLayer, trie_at: list[tuple[Trie, int, int]], hidden: torch.Tensor,
             logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """Store on each trie what loss calls need from ``d0`` (see :class:`Trie`), from a recorded pass."""
    rows = torch.tensor([row for trie, row, _ in trie_at for _ in trie.overridden])
    nodes = torch.tensor([at + node for trie, _, at in trie_at for node in trie.overridden])
    experts = d0.every_expert(x[rows.to(x.device), nodes.to(x.device)]).split(
        [len(trie.overridden) for trie, _, _ in trie_at])
    for (trie, row, at), routed in zip(trie_at, experts):
        over = [at + node for node in trie.overridden]
        trie.hidden = hidden[row, at:at + len(trie)].clone()
        trie.rest = (hidden[row, over] - y[row, over]).clone()
        trie.experts = routed.clone()
        trie.logits = logits[row, over].clone()
