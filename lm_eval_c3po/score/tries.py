"""Answer tries: the tokens of one example after its split position, shared while its choices agree.

An example's rows after the first overridden position ``p0`` are the same
context tokens for every choice (the *trunk*, holding the overridden
positions) followed by each choice's answer tokens, so they form a trie: the
trunk once, then the answer tokens, shared by the choices while they agree.
Tree attention (each node sees the prefix and its own ancestors, at its own
position in the unsplit row) gives every node exactly the hidden states of
the unsplit rows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lm_eval_c3po.routing import token_positions


@dataclass
class Trie:
    """The tokens of one example after its split position, as a trie (see the module docstring).

    Nodes are in topological order: the trunk (context tokens ``p0..``, a
    chain) first, then the answer tokens that are inputs (all but each
    answer's last). ``scored[c]`` lists, for choice c, the nodes whose output
    predicts its answer tokens and those tokens.
    """

    group: int  # the example's prefix group it continues (index into PreparedNeighbour.prefix_kv)
    prefix_len: int  # p0
    tokens: list[int]
    depth: list[int]  # node n sits at position p0 + depth[n] of the unsplit row
    parent: list[int]  # -1 for the first trunk node
    overridden: list[int]  # the nodes at the overridden positions (distinct, ascending)
    slot_nodes: list[int]  # per token slot of the spec (token_slots order), its node (slots may share one)
    last_context: int  # the node of the last context token
    scored: dict[int, list[tuple[int, int]]]  # choice -> [(node, target token)]
    # Set by _prepare, from the first critical layer d0 (see FirstCriticalLayer):
    hidden: torch.Tensor | None = None  # [N, H] leaving d0 under the model's own routing
    rest: torch.Tensor | None = None  # [O, H] that output at the overridden nodes less its routed experts' part
    experts: torch.Tensor | None = None  # [O, E, H] every routed expert's output at the overridden nodes
    logits: torch.Tensor | None = None  # [O, E] d0's router logits there

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.hidden, self.rest, self.experts, self.logits]

    @functools.cached_property
    def writer(self) -> list[int]:
        """Per overridden node, the slot whose pathway is written there: the last slot on it (as the router
        override does, :func:`~lm_eval_c3po.routing.control._last_write_wins`)."""
        return [max(j for j, node in enumerate(self.slot_nodes) if node == n) for n in self.overridden]

    @functools.cached_property
    def slot_index(self) -> list[int]:
        """Per slot, the index of its node among :attr:`overridden` (where its own routing is read)."""
        return [self.overridden.index(node) for node in self.slot_nodes]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def trunk_len(self) -> int:
        """Nodes up to the last context token: the trunk comes first, so they are a leading slice."""
        return self.last_context + 1

    @functools.cached_property
    def visible(self) -> torch.Tensor:
        """``[N, N]`` bool: node n attends to node m iff m is n or one of its ancestors."""
        out = torch.eye(len(self), dtype=torch.bool)
        for node, parent in enumerate(self.parent):
            if parent >= 0:
                out[node] |= out[parent]
        return out


def build_tries(rows: Sequence[tuple[Sequence[int], int, Sequence[int]]], tokens: str
                ) -> tuple[list[tuple[int, ...]], list[Trie], list[int]]:
    """Prefixes, tries and each choice's trie of one example from lm-eval's rows ``(whole, ctx_len, answer)``.

    ``whole`` is a choice's truncated input row (context then all but the last
    answer token) and ``ctx_len`` its number of context tokens.
    """
    prefixes: dict[tuple[int, ...], int] = {}
    tries: dict[tuple, Trie] = {}
    index: dict[tuple, int] = {}  # trie key -> its place in the returned list
    branch_node: dict[tuple, int] = {}
    choice_trie = []
    for choice, (whole, ctx_len, answer) in enumerate(rows):
        positions = token_positions(tokens, [ctx_len])[0].tolist()
        p0 = min(positions)
        prefix, trunk = tuple(whole[:p0]), tuple(whole[p0:ctx_len])
        group = prefixes.setdefault(prefix, len(prefixes))
        key = (group, trunk)
        if key not in tries:
            index[key] = len(tries)
            tries[key] = Trie(group, p0, list(trunk), list(range(len(trunk))), list(range(-1, len(trunk) - 1)),
                              sorted({p - p0 for p in positions}), [p - p0 for p in positions], len(trunk) - 1, {})
        trie = tries[key]
        choice_trie.append(index[key])
        node = trie.last_context
        scored = [(node, int(answer[0]))]
        for j, token in enumerate(whole[ctx_len:]):
            branch = (key, tuple(whole[ctx_len:ctx_len + j + 1]))
            if branch not in branch_node:
                branch_node[branch] = len(trie.tokens)
                trie.tokens.append(int(token))
                trie.depth.append(len(trunk) + j)
                trie.parent.append(node)
            node = branch_node[branch]
            scored.append((node, int(answer[j + 1])))
        trie.scored[choice] = scored
    return list(prefixes), list(tries.values()), choice_trie
