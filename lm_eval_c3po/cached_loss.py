"""The neighbourhood loss of NGD / kernel regression at the cost of the answer tokens in the critical layers.

:class:`~lm_eval_c3po.remix.ChoiceLoss` runs the whole model on every
(context, neighbour, choice) row at every call: 11 full passes per NGD run.
But omega only changes the routing at the neighbour's overridden context
token(s) and only in the critical layers, and attention is causal, so for a
row split at its first overridden position ``p0``:

- every layer's keys/values of the *prefix* ``row[:p0]`` are independent of
  omega, and the prefix is shared by all choices of a neighbour;
- every layer below the first critical decoder layer ``d0`` is independent
  of omega at every position.

The tokens after the split are the same context tokens for every choice (the
*trunk*, holding the overridden positions) followed by each choice's answer
tokens, so an example's rows form a trie: the trunk once, then the answer
tokens, shared by the choices while they agree. Tree attention (each node
sees the prefix and its own ancestors, at its own position in the unsplit
row) gives every node exactly the hidden states of the unsplit rows.

So a neighbour is *prepared* once (no grad): one pass of the model over its
prefix (keeping the key/value cache; prefixes packed several to a row), then
the layers up to ``d0`` over its trie. In ``d0`` itself omega enters
linearly, at the overridden nodes only (:class:`FirstCriticalLayer`), so
``d0``'s output is kept too, with every routed expert's output at the
overridden nodes. A loss call then forms ``d0``'s output from omega by a
weighted sum and runs only the layers after ``d0`` over the tries, with the
prefix keys/values of those layers, using the model's own decoder layers,
rotary embedding and :class:`~transformers.DynamicCache`, with the tree as a
4-D attention mask (SDPA or eager attention). The candidates of one call
(kernel regression's alpha grid) are copies of the trie side by side in one
row, so each prefix's keys/values are read once per call, not once per
candidate and choice. Prepared neighbours live in a bounded LRU
(:class:`PrefixCache`) that a Remixer shares across its loss objects, so a
reference that is a neighbour of several test contexts is prepared once.

The same machinery scores lm-eval's test contexts (:meth:`CachedChoiceLoss.own_routing`,
:meth:`CachedChoiceLoss.row_scores`): one prepared pass per context yields its own
pathway (the routing at its last token, no override) and, once omega* is
known, the log-likelihood of every choice at the cost of its trie.

Families whose forward differs from the plain ``embed -> layers -> norm ->
lm_head`` loop (e.g. GraniteMoE's multipliers, PhiMoE's long-rope scaling),
sliding-window attention narrower than the rows, and attention kernels that
take no arbitrary mask (flash attention) fall back to the reference
:class:`ChoiceLoss` (logged once per family).
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from lm_eval_c3po.remix import ChoiceLoss, Example
from lm_eval_c3po.routing import MoELayer, RoutingController, input_device, token_positions

logger = logging.getLogger(__name__)

# Families whose CausalLM forward is exactly embed -> decoder layers (one causal mask) -> norm -> lm_head,
# checked against the reference loss in tests/test_cached_loss.py.
FAST_FAMILIES = frozenset({"olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3"})
DEFAULT_CACHE_BYTES = 1 << 30
MASKED_ATTENTION = frozenset({"sdpa", "eager"})  # kernels that take the tree mask
CALL_COST_TOKENS = 256  # a forward call's fixed cost (kernel launches, routing sort), in tokens' worth
_warned: set[str] = set()

KV = tuple[torch.Tensor, torch.Tensor]


class PrefixCache:
    """A byte-bounded LRU of :class:`PreparedNeighbour`, shared by the loss objects of one model.

    Keys are the example's token ids plus everything that shapes its rows
    (``max_length``, token spec, first critical decoder layer), so a
    reference row retrieved for several test contexts is prepared once.
    ``prepared`` counts neighbours prepared (each is one prefix pass).
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.prepared = 0
        self._entries: OrderedDict[tuple, PreparedNeighbour] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: tuple) -> PreparedNeighbour | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple, entry: PreparedNeighbour) -> None:
        if key in self._entries:
            return
        self._entries[key] = entry
        self._bytes += entry.nbytes
        while self._bytes > self.max_bytes and self._entries:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes


def fast_path_applies(model: torch.nn.Module, routing: RoutingController, layer_ids: Sequence[int],
                      max_length: int) -> bool:
    """Whether the trie recomputation reproduces ``model``'s forward; logs the reason once if not."""
    config = model.config
    family = getattr(config, "model_type", type(model).__name__)
    inner = getattr(model, "model", None)
    window = getattr(config, "sliding_window", None) or None
    reason = None
    if family not in FAST_FAMILIES:
        reason = f"model type {family!r} is not one of {sorted(FAST_FAMILIES)}"
    elif not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")) or not hasattr(
        model, "lm_head"
    ):
        reason = "the model lacks the model.{embed_tokens,layers,norm,rotary_emb} / lm_head layout"
    elif any(routing.layers[i].decoder_layer is None for i in layer_ids):
        reason = "a critical router's decoder layer could not be located"
    elif FirstCriticalLayer.find(model, routing, layer_ids) is None:
        reason = "the first critical router has no `experts` module beside it"
    elif window is not None and window < max_length:
        reason = f"sliding-window attention ({window}) is narrower than max_length ({max_length})"
    elif getattr(config, "_attn_implementation", "sdpa") not in MASKED_ATTENTION:
        reason = f"attention implementation {config._attn_implementation!r} takes no tree mask"
    if reason is not None and family not in _warned:
        _warned.add(family)
        logger.info("c3po: neighbourhood loss without prefix caching for %s: %s", family, reason)
    return reason is None


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
    last_context: int  # the node of the last context token
    scored: dict[int, list[tuple[int, int]]]  # choice -> [(node, target token)]
    # Set by _prepare, from the first critical layer d0 (see FirstCriticalLayer):
    hidden: torch.Tensor | None = None  # [N, H] leaving d0 under the model's own routing
    rest: torch.Tensor | None = None  # [O, H] that output at the overridden nodes less its routed experts' part
    experts: torch.Tensor | None = None  # [O, E, H] every routed expert's output at the overridden nodes
    logits: torch.Tensor | None = None  # [O, E] d0's router logits there
    own_logits: torch.Tensor | None = None  # [E] d0's router logits at the last context node

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.hidden, self.rest, self.experts, self.logits, self.own_logits]

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


@dataclass
class PreparedNeighbour:
    """One example, ready for loss calls: prefix keys/values of the layers after ``d0``, and tries.

    ``prefix_kv[g][j]`` holds the keys/values (``[1, heads, p, dim]``) of prefix
    group ``g`` in decoder layer ``d0 + 1 + j``; ``choice_trie[c]`` is the trie that
    holds choice c (choices share one unless truncation shifted their prefixes).
    """

    prefix_kv: list[list[KV]]
    tries: list[Trie]
    choice_trie: list[int]

    @property
    def nbytes(self) -> int:
        tensors = [t for group in self.prefix_kv for kv in group for t in kv]
        tensors += [t for trie in self.tries for t in trie.tensors]
        return sum(t.numel() * t.element_size() for t in tensors)


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
                              sorted({p - p0 for p in positions}), len(trunk) - 1, {})
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


@dataclass(frozen=True)
class FirstCriticalLayer:
    """The first critical decoder layer ``d0``, where omega enters linearly.

    In ``d0`` the keys/values, the router's input and the output of every node
    but the overridden ones are independent of omega, and at an overridden
    node the layer's output is ``rest + sum_k w_k expert_{i_k}(x)``, with
    ``(w, i)`` the family's routing rule applied to omega and ``rest`` (the
    residual stream plus any shared expert) independent of it. So ``d0`` runs
    once per example, at preparation, keeping every routed expert's output at
    the overridden nodes, and a loss call starts at ``d0 + 1`` with a weighted
    sum: one critical layer fewer per call.
    """

    decoder: int  # its decoder layer index
    slot: int  # its position in the critical layer ids (omega's layer axis)
    layer: MoELayer
    experts: torch.nn.Module  # the MoE block's routed experts, called as experts(x, index, weights)
    later_slots: tuple[int, ...]  # omega's other layer slots: the critical layers a call still hooks
    later_layers: tuple[int, ...]  # their MoE layer ids

    @classmethod
    def find(cls, model, routing: RoutingController, layer_ids: Sequence[int]) -> FirstCriticalLayer | None:
        slot = min(range(len(layer_ids)), key=lambda s: routing.layers[layer_ids[s]].decoder_layer)
        layer = routing.layers[layer_ids[slot]]
        experts = getattr(model.get_submodule(layer.name.rpartition(".")[0]), "experts", None)
        later = tuple(s for s in range(len(layer_ids)) if s != slot)
        return None if experts is None else cls(layer.decoder_layer, slot, layer, experts, later,
                                                 tuple(layer_ids[s] for s in later))

    def mix(self, omega: torch.Tensor, logits: torch.Tensor, rest: torch.Tensor, experts: torch.Tensor
            ) -> torch.Tensor:
        """The layer's output ``[M, H]`` at overridden nodes routed by ``omega [M, E]``, as the experts sum it."""
        weights, index = self.layer.adapter.route(self.layer.router, omega.to(logits.device, torch.float32), logits)
        chosen = experts.gather(1, index.unsqueeze(-1).expand(-1, -1, experts.shape[-1]))
        return rest + (chosen * weights.to(chosen.dtype).unsqueeze(-1)).sum(1)

    def every_expert(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, E, H]``: each routed expert's output for each row of ``x [M, H]`` (weight 1)."""
        count = self.layer.router.num_experts
        index = torch.arange(count, device=x.device).repeat(len(x)).unsqueeze(1)
        weights = torch.ones(len(index), 1, dtype=x.dtype, device=x.device)
        return self.experts(x.repeat_interleave(count, 0), index, weights).view(len(x), count, -1)

    @contextmanager
    def recording(self) -> Iterator[dict[str, torch.Tensor]]:
        """Record the router logits and the experts' input and output of every token of one pass."""
        got: dict[str, torch.Tensor] = {}

        def router_hook(module, args, output):
            got["logits"] = output[0].reshape(-1, output[0].shape[-1])

        def experts_hook(module, args, output):
            got["x"], got["y"] = args[0].reshape(-1, args[0].shape[-1]), output.reshape(-1, output.shape[-1])

        handles = [self.layer.router.register_forward_hook(router_hook),
                   self.experts.register_forward_hook(experts_hook)]
        try:
            yield got
        finally:
            for handle in handles:
                handle.remove()


class CachedChoiceLoss(ChoiceLoss):
    """:class:`ChoiceLoss` (same arguments, values and gradients) recomputing only the critical layers of tries.

    The parent builds the rows and turns per-row log-likelihoods into the
    kernel-weighted choice cross-entropy; this class replaces only how the
    log-likelihoods are computed (see the module docstring). The parent's
    ``max_rows`` chunking is replaced by a token budget: a chunk holds as many
    trie nodes as ``max_rows`` full rows would hold tokens.
    """

    def __init__(self, model, routing, layer_ids, tokens, examples, weights, max_length, max_rows: int = 64,
                 cache: PrefixCache | None = None):
        super().__init__(model, routing, layer_ids, tokens, examples, weights, max_length, max_rows)
        self._budget_rows = max_rows
        self.max_rows = sys.maxsize  # the parent hands every job to _log_likelihoods at once
        self._cache = cache if cache is not None else PrefixCache()
        self._fast = fast_path_applies(model, routing, self.layer_ids, max_length)
        self._d0 = FirstCriticalLayer.find(model, routing, self.layer_ids) if self._fast else None
        self._max_length = max_length
        self._index = {row[:3]: n for n, row in enumerate(self._rows)}
        self._batch: _TrieBatch | None = None

    def _trie_batch(self) -> _TrieBatch:
        if self._batch is None:
            self._batch = self._assemble()
        return self._batch

    # -- the parent's hook ----------------------------------------------------

    def _log_likelihoods(self, flat: torch.Tensor, jobs, per: int) -> torch.Tensor:
        if not self._fast:
            size = self._budget_rows
            parts = [super(CachedChoiceLoss, self)._log_likelihoods(flat, jobs[s:s + size], per)
                     for s in range(0, len(jobs), size)]
            return torch.cat(parts) if parts else flat.new_zeros(0)
        ll, _ = self._trie_batch().log_likelihoods(self, flat, per)
        return ll[torch.tensor([g * len(self._rows) + self._index[row[:3]] for g, row in jobs], dtype=torch.long)]

    # -- scoring the examples themselves (lm-eval's test contexts) ------------

    def own_routing(self) -> torch.Tensor:
        """Each context's own routing ``[B, L_crit, E]`` at its last context token (no override).

        Read from the pass over its first choice's trie, so scoring the choices
        afterwards (:meth:`row_scores`) reuses this pass's prefix instead of
        running the context again.
        """
        self._require_fast()
        with torch.no_grad():
            return self._trie_batch().own_routing(self)

    def row_scores(self, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """lm-eval's ``(log-likelihood, is_greedy)`` of every row with context b's ``omega[b]`` written in.

        Rows are in ``self._rows`` order: (context, example, choice).
        """
        self._require_fast()
        with torch.no_grad():
            return self._trie_batch().log_likelihoods(self, omega, 1, greedy=True)

    def _require_fast(self) -> None:
        if not self._fast:
            raise RuntimeError("scoring from prepared tries needs a model on the prefix-cached path")

    # -- preparation ----------------------------------------------------------

    def _key(self, example: Example) -> tuple:
        choices = tuple(tuple(int(t) for t in c) for c in example.choices)
        return tuple(int(t) for t in example.context), choices, self._max_length, self.tokens, self._d0.decoder

    def _assemble(self) -> _TrieBatch:
        """Prepare (or fetch) every example of this loss and lay their tries out for batched calls."""
        wanted: dict[tuple, tuple[int, int]] = {}
        for b, items in enumerate(self.examples):
            for i, example in enumerate(items):
                wanted.setdefault(self._key(example), (b, i))
        entries: dict[tuple, PreparedNeighbour] = {}
        missing = []
        for key in wanted:
            entry = self._cache.get(key)
            if entry is None:
                missing.append(key)
            else:
                entries[key] = entry
        if missing:
            skeletons = [build_tries(self._rows_of(*wanted[key]), self.tokens) for key in missing]
            with torch.no_grad():
                prepared = _prepare(self.model, self._d0, skeletons, self._budget_rows * self._full_width)
            for key, entry in zip(missing, prepared):
                self._cache.put(key, entry)
                self._cache.prepared += 1
                entries[key] = entry
        return _TrieBatch.build(self, entries)

    @property
    def _full_width(self) -> int:
        """The longest unsplit row: ``max_rows`` rows of it are the memory a chunk may take."""
        return max(len(row[3]) for row in self._rows)

    def _rows_of(self, b: int, i: int) -> list[tuple[list[int], int, Sequence[int]]]:
        """``(whole, ctx_len, answer)`` of every choice of example ``(b, i)``."""
        return [(row[3], row[4], self.examples[b][i].choices[row[2]])
                for row in self._rows if row[0] == b and row[1] == i]


def _left_pad(tensors: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Stack ``[1, heads, p_n, dim]`` tensors into ``[N, heads, width, dim]``, each right-aligned."""
    first = tensors[0]
    out = first.new_zeros(len(tensors), first.shape[1], width, first.shape[3])
    for n, t in enumerate(tensors):
        if t.shape[2]:
            out[n, :, width - t.shape[2]:] = t[0]
    return out


def _run_layers(model, hidden: torch.Tensor, prefix_kv: list[KV], prefix_len: torch.Tensor, depth: torch.Tensor,
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
    mask = _tree_mask(model.config, prefix_valid, visible.to(device), hidden.dtype)
    return _layers(model, hidden, mask, prefix_len.unsqueeze(1) + depth.to(device), cache, first, last)


def _tree_mask(config, prefix_valid: torch.Tensor, visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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


def _chunks(sizes: Sequence[int], budget: int, call_cost: int = CALL_COST_TOKENS) -> list[list[int]]:
    """Indices grouped into right-padded chunks of at most ``budget`` tokens, at least cost.

    A chunk costs its rows times its widest row (padding included) plus
    ``call_cost``, the fixed cost of a forward call in tokens. Sorted longest
    first, the best split into contiguous runs is found exactly by dynamic
    programming: short rows are neither padded to long ones, nor run in many
    small calls.
    """
    order = sorted(range(len(sizes)), key=lambda n: -sizes[n])
    widths = [max(sizes[n], 1) for n in order]
    best = [0] + [sys.maxsize] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end - 1, -1, -1):
            if end - start > 1 and (end - start) * widths[start] > budget:
                break
            cost = best[start] + (end - start) * widths[start] + call_cost
            if cost < best[end]:
                best[end], cut[end] = cost, start
    out, end = [], len(order)
    while end:
        out.append(order[cut[end]:end])
        end = cut[end]
    return out[::-1]


def _pack(sizes: Sequence[int]) -> list[list[int]]:
    """Non-empty sequences packed first-fit, longest first, into rows twice as long as the longest one.

    A packed row attends block-diagonally, so a prefix pass costs about the
    tokens it has rather than every row padded to the longest (attention over
    the row's width grows, but stays small next to the experts at twice a prefix).
    """
    capacity = 2 * max(sizes, default=0)
    rows: list[list[int]] = []
    free: list[int] = []
    for n in sorted(range(len(sizes)), key=lambda n: -sizes[n]):
        if not sizes[n]:
            continue
        fit = next((r for r, room in enumerate(free) if room >= sizes[n]), None)
        if fit is None:
            rows.append([])
            free.append(capacity)
            fit = len(rows) - 1
        rows[fit].append(n)
        free[fit] -= sizes[n]
    return rows


def _prepare(model, d0: FirstCriticalLayer, skeletons: list[tuple[list[tuple[int, ...]], list[Trie], list[int]]],
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
    rows = _pack(sizes)
    for chunk in _chunks([sum(sizes[n] for n in row) for row in rows], budget_tokens):
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
                _causal_segment(position_ids[row], visible[row], start, size)
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
        mask = _tree_mask(model.config, torch.ones(len(packed), 0, dtype=torch.bool), visible, inner.dtype)
        with d0.recording() as got:
            hidden = _layers(model, inner.embed_tokens(ids.to(device)), mask.to(device), position_ids.to(device),
                             None, 0, first + 1)
        _keep_d0(d0, trie_at, hidden, *(got[name].view(len(packed), width, -1) for name in ("logits", "x", "y")))
        if first + 1 < num_layers and spans:
            prefix_kv.update(_prefix_kv_after(model, hidden, spans, first + 1))
    empty = [n for n, key in enumerate(keys) if not key]
    if empty and first + 1 < num_layers:
        kv = _empty_kv(model, num_layers, device)[first + 1:]
        for n in empty:
            prefix_kv[n] = kv
    return [PreparedNeighbour([prefix_kv[prefix_id[p]] for p in prefixes], tries, choice_trie)
            for prefixes, tries, choice_trie in skeletons]


def _causal_segment(position_ids: torch.Tensor, visible: torch.Tensor, start: int, size: int) -> None:
    """Lay one causal sequence at ``start`` of a packed row: positions from 0, attending only within itself."""
    position_ids[start:start + size] = torch.arange(size)
    visible[start:start + size, start:start + size] = torch.ones(size, size, dtype=torch.bool).tril()


def _prefix_kv_after(model, hidden: torch.Tensor, spans: list[tuple[int, int, int, int]], first: int
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
            _causal_segment(position_ids[r], visible[r], at, size)
            placed.append((n, r, at, size))
            at += size
    source = torch.tensor(list(by_row)).unsqueeze(1).expand_as(take)
    mask = _tree_mask(model.config, torch.ones(len(by_row), 0, dtype=torch.bool), visible, inner.dtype)
    cache = DynamicCache(ddp_cache_data=[(None, None)] * len(inner.layers))
    _layers(model, hidden[source.to(device), take.to(device)], mask.to(device), position_ids.to(device), cache,
            first, len(inner.layers))
    return {n: [(cache.layers[j].keys[r:r + 1, :, at:at + size].clone(),
                 cache.layers[j].values[r:r + 1, :, at:at + size].clone()) for j in range(first, len(inner.layers))]
            for n, r, at, size in placed}


def _layers(model, hidden: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache | None,
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


def _keep_d0(d0: FirstCriticalLayer, trie_at: list[tuple[Trie, int, int]], hidden: torch.Tensor,
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
        trie.own_logits = logits[row, at + trie.last_context].clone()


def _empty_kv(model, num_layers: int, device) -> list[KV]:
    """Zero-length keys/values per layer for a row whose first token is overridden (shapes from a 1-token pass)."""
    cache = model.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True).past_key_values
    return [(cache.layers[j].keys[:, :, :0].clone(), cache.layers[j].values[:, :, :0].clone())
            for j in range(num_layers)]


@dataclass
class _TrieBatch:
    """The tries of one loss object, with their prefixes' keys/values stacked once; sliced per chunk at every call.

    A call with ``per`` pathways per context lays ``per`` copies of a trie side
    by side in one row (copy g at offset ``g * width`` of its chunk), each
    copy with its own pathway written at its overridden nodes.
    """

    tries: list[Trie]
    owner: list[int]  # the context b each trie belongs to
    group: torch.Tensor  # [T] index into kv
    kv: list[KV]  # per layer after d0: [U, heads, P_max, dim] left-padded prefix keys/values
    scored: list[torch.Tensor]  # per trie [S, 3]: (node, target token, row in loss._rows) per scored token
    own_trie: list[int | None]  # per context: the trie of its first example's first choice (None: no example)
    num_rows: int
    budget_tokens: int
    kv_budget: int  # prefix positions x critical layers a chunk may hold

    @classmethod
    def build(cls, loss: CachedChoiceLoss, entries: dict[tuple, PreparedNeighbour]) -> _TrieBatch:
        tries, owner, group, scored, group_kv, own_trie = [], [], [], [], [], []
        groups: dict[tuple[int, int], int] = {}  # (entry, prefix group) -> kv index
        for b, items in enumerate(loss.examples):
            own_trie.append(None)
            for i, example in enumerate(items):
                entry = entries[loss._key(example)]
                base = len(tries)
                if i == 0:
                    own_trie[b] = base + entry.choice_trie[0]
                for trie in entry.tries:
                    gid = groups.setdefault((id(entry), trie.group), len(group_kv))
                    if gid == len(group_kv):
                        group_kv.append(entry.prefix_kv[trie.group])
                    tries.append(trie)
                    owner.append(b)
                    group.append(gid)
                    scored.append([])
                for c, t in enumerate(entry.choice_trie):
                    row = loss._index[(b, i, c)]
                    scored[base + t] += [(node, target, row) for node, target in entry.tries[t].scored[c]]
        layers = len(group_kv[0])  # the layers after d0 (none when d0 is the last layer)
        pad = max(kv[0][0].shape[2] for kv in group_kv) if layers else 0
        kv = [(_left_pad([g[j][0] for g in group_kv], pad), _left_pad([g[j][1] for g in group_kv], pad))
              for j in range(layers)]
        budget = loss._budget_rows * loss._full_width
        scored = [torch.tensor(s, dtype=torch.long).view(-1, 3) for s in scored]
        return cls(tries, owner, torch.tensor(group), kv, scored, own_trie, len(loss._rows), budget,
                   budget * len(loss.model.model.layers))

    def _chunks(self, per: int) -> list[list[int]]:
        """Tries grouped longest first within the token budget and the prefix keys/values budget."""
        full = self.kv[0][0].shape[2] * len(self.kv) if self.kv else 0
        rows_for_kv = max(1, self.kv_budget // max(full, 1))
        out = []
        for chunk in _chunks([per * len(t) for t in self.tries], self.budget_tokens):
            out += [chunk[s:s + rows_for_kv] for s in range(0, len(chunk), rows_for_kv)]
        return out

    def run(self, loss: CachedChoiceLoss, chunk: list[int], omega: torch.Tensor | None, per: int,
            trunk_only: bool = False) -> torch.Tensor:
        """Final hidden states ``[n, per * width, H]`` of the tries ``chunk``, copy g with pathway
        ``omega[owner * per + g]`` written in (differentiable) or, for ``None``, the model's own routing.

        ``trunk_only`` runs each trie's trunk alone (:attr:`Trie.trunk_len` nodes), for what needs
        no answer token.
        """
        model, d0 = loss.model, loss._d0
        picked = [self.tries[n] for n in chunk]
        sizes = [t.trunk_len if trunk_only else len(t) for t in picked]
        width = max(sizes)
        device = picked[0].hidden.device
        hidden = picked[0].hidden.new_zeros(len(picked), width, picked[0].hidden.shape[-1])
        depth = torch.zeros(len(picked), width, dtype=torch.long)
        visible = torch.zeros(len(picked), per * width, per * width, dtype=torch.bool)
        for row, (trie, size) in enumerate(zip(picked, sizes)):
            hidden[row, :size] = trie.hidden[:size]
            depth[row, :size] = torch.tensor(trie.depth[:size])
            block = torch.eye(width, dtype=torch.bool)
            block[:size, :size] = trie.visible[:size, :size]
            visible[row] = torch.block_diag(*[block] * per)
        prefix_len = torch.tensor([t.prefix_len for t in picked])
        kv = []
        if self.kv:
            groups, pad, full = self.group[chunk].to(device), int(prefix_len.max()), self.kv[0][0].shape[2]
            kv = [(k.index_select(0, groups)[:, :, full - pad:], v.index_select(0, groups)[:, :, full - pad:])
                  for k, v in self.kv]
        hidden, depth = hidden.repeat(1, per, 1), depth.repeat(1, per)
        layers = (d0.decoder + 1, len(model.model.layers))
        if omega is None:
            return _run_layers(model, hidden, kv, prefix_len, depth, visible, *layers)

        # Write each copy's pathway in: at d0 by its linear mix, in later critical layers by the router hooks.
        rows, positions, jobs = [], [], []
        for row, (n, trie) in enumerate(zip(chunk, picked)):
            for g in range(per):
                rows += [row] * len(trie.overridden)
                positions += [g * width + node for node in trie.overridden]
                jobs += [self.owner[n] * per + g] * len(trie.overridden)
        pathways = omega[torch.tensor(jobs, device=omega.device)]  # [M, Lc, E]
        mixed = d0.mix(pathways[:, d0.slot],
                       *(torch.cat([getattr(t, name).repeat(per, *[1] * (getattr(t, name).dim() - 1)) for t in picked])
                         for name in ("logits", "rest", "experts")))
        hidden = hidden.index_put((torch.tensor(rows, device=device), torch.tensor(positions, device=device)),
                                  mixed.to(hidden.dtype))
        if not d0.later_slots:
            return _run_layers(model, hidden, kv, prefix_len, depth, visible, *layers)
        slots = max(per * len(t.overridden) for t in picked)
        where = torch.full((len(picked), slots), -1, dtype=torch.long)
        written = pathways.new_zeros(len(picked), slots, len(d0.later_slots), pathways.shape[-1])
        counts = [0] * len(picked)
        for m, (row, position) in enumerate(zip(rows, positions)):
            where[row, counts[row]] = position
            written[row, counts[row]] = pathways[m, list(d0.later_slots)]
            counts[row] += 1
        with loss.routing.override(where, written, layers=d0.later_layers):
            return _run_layers(model, hidden, kv, prefix_len, depth, visible, *layers)

    def own_routing(self, loss: CachedChoiceLoss) -> torch.Tensor:
        """The routing ``[B, Lc, E]`` of each context's own trie at its last context token."""
        d0 = loss._d0
        out: dict[int, torch.Tensor] = {}
        if None in self.own_trie:
            raise ValueError("own routing needs at least one example per context")
        wanted = sorted(set(self.own_trie))
        for chunk in _chunks([self.tries[n].trunk_len for n in wanted], self.budget_tokens):
            chunk = [wanted[n] for n in chunk]
            routing = torch.empty(len(chunk), len(loss.layer_ids), loss.routing.num_experts)
            logits = torch.stack([self.tries[n].own_logits for n in chunk])
            routing[:, d0.slot] = d0.layer.adapter.distribution(d0.layer.router, logits).float().cpu()
            if d0.later_slots:
                nodes = torch.tensor([[self.tries[n].last_context] for n in chunk])
                with loss.routing.capture(nodes, layers=d0.later_layers) as cap:
                    self.run(loss, chunk, None, 1, trunk_only=True)
                routing[:, list(d0.later_slots)] = cap.routing[:, 0].float()
            out.update(zip(chunk, routing))
        return torch.stack([out[n] for n in self.own_trie])

    def log_likelihoods(self, loss: CachedChoiceLoss, omega: torch.Tensor, per: int, greedy: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Summed answer log-likelihood ``[per * rows]`` (job ``g * rows + r``: row r of ``loss._rows``
        under pathway ``omega[b * per + g]``) and, with ``greedy``, lm-eval's is-greedy flag.

        Only the scored nodes reach the (vocabulary-wide) head.
        """
        model = loss.model
        ll = omega.new_zeros(per * self.num_rows, dtype=torch.float32, device=loss.device)
        missed = torch.zeros(per * self.num_rows, device=loss.device)
        for chunk in self._chunks(per):
            hidden = self.run(loss, chunk, omega, per)
            width = hidden.shape[1] // per
            scored = torch.cat([self.scored[n] for n in chunk])  # [S, 3]
            rows = torch.repeat_interleave(torch.arange(len(chunk)), torch.tensor([len(self.scored[n]) for n in chunk]))
            copies = torch.arange(per).unsqueeze(1)  # every scored token once per copy g
            rows = rows.expand(per, -1).reshape(-1).to(hidden.device)
            nodes = (copies * width + scored[:, 0]).reshape(-1).to(hidden.device)
            targets_t = scored[:, 1].expand(per, -1).reshape(-1).to(hidden.device)
            jobs_t = (copies * self.num_rows + scored[:, 2]).reshape(-1).to(ll.device)
            logits = model.lm_head(model.model.norm(hidden[rows, nodes])).float()
            token_ll = torch.log_softmax(logits, dim=-1).gather(-1, targets_t.unsqueeze(-1)).squeeze(-1)
            ll = ll.index_add(0, jobs_t, token_ll.to(ll.device))
            if greedy:
                missed.index_add_(0, jobs_t, (logits.argmax(-1) != targets_t).float().to(ll.device))
        return ll, (missed == 0).cpu() if greedy else None
