"""Log-likelihoods of answer rows at the cost of the answer tokens in the critical layers.

:class:`~lm_eval_c3po.score.full_rows.FullRowScorer` runs the whole model on
every (context, neighbour, choice) row at every call: 11 full passes per NGD run.
But omega only changes the routing at the neighbour's overridden context
token(s) and only in the critical layers, and attention is causal, so for a
row split at its first overridden position ``p0``:

- every layer's keys/values of the *prefix* ``row[:p0]`` are independent of
  omega, and the prefix is shared by all choices of a neighbour;
- every layer below the first critical decoder layer ``d0`` is independent
  of omega at every position.

The tokens after the split form an answer trie (:mod:`lm_eval_c3po.score.tries`).

So a neighbour is *prepared* once (no grad): one pass of the model over its
prefix (keeping the key/value cache; prefixes packed several to a row), then
the layers up to ``d0`` over its trie. In ``d0`` itself omega enters
linearly, at the overridden nodes only (:class:`~lm_eval_c3po.score.first_layer.FirstCriticalLayer`), so
``d0``'s output is kept too, with every routed expert's output at the
overridden nodes. A loss call then forms ``d0``'s output from omega by a
weighted sum and runs only the layers after ``d0`` over the tries, with the
prefix keys/values of those layers, using the model's own decoder layers,
rotary embedding and :class:`~transformers.DynamicCache`, with the tree as a
4-D attention mask (SDPA or eager attention). The candidates of one call
(kernel regression's alpha grid) are copies of the trie side by side in one
row, so each prefix's keys/values are read once per call, not once per
candidate and choice. Prepared neighbours live in a bounded LRU
(:class:`~lm_eval_c3po.score.prefix_cache.PrefixCache`) that a Remixer shares across its loss objects, so a
reference that is a neighbour of several test contexts is prepared once.

The same machinery scores lm-eval's test contexts (:meth:`TrieScorer.own_routing`,
:meth:`TrieScorer.row_scores`): one prepared pass per context yields its own
pathway (the routing at its last token, no override) and, once omega* is
known, the log-likelihood of every choice at the cost of its trie.

Families whose forward differs from the plain ``embed -> layers -> norm ->
lm_head`` loop (e.g. GraniteMoE's multipliers, PhiMoE's long-rope scaling),
sliding-window attention narrower than the rows, and attention kernels that
take no arbitrary mask (flash attention) fall back to the reference
scorer (logged once per family; :func:`prefix_cached_path`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lm_eval_c3po.routing import FAMILIES, RoutingController, input_device
from lm_eval_c3po.score.decoder import KV, left_pad, run_after_prefix
from lm_eval_c3po.score.examples import Example, answer_log_probs, layout_rows
from lm_eval_c3po.score.first_layer import FirstCriticalLayer
from lm_eval_c3po.score.packing import CHUNK_ROWS, chunk_by_cost
from lm_eval_c3po.score.prefix_cache import PrefixCache, PreparedNeighbour
from lm_eval_c3po.score.prepare import prepare
from lm_eval_c3po.score.tries import Trie, build_tries

logger = logging.getLogger(__name__)

MASKED_ATTENTION = frozenset({"sdpa", "eager"})  # kernels that take the tree mask
_warned: set[str] = set()


def fast_path_applies(model: torch.nn.Module, routing: RoutingController, layer_ids: Sequence[int],
                      max_length: int) -> bool:
    """Whether the trie recomputation reproduces ``model``'s forward; logs the reason once if not."""
    config = model.config
    family = getattr(config, "model_type", type(model).__name__)
    inner = getattr(model, "model", None)
    window = getattr(config, "sliding_window", None) or None
    reason = None
    if routing.family is None or not routing.family.prefix_cached:
        cached = sorted(name for name, entry in FAMILIES.items() if entry.prefix_cached)
        reason = f"model type {family!r} is not one of {cached} (routing.families.FAMILIES)"
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



class TrieScorer:
    """Row log-likelihoods of ``examples`` under pathways, recomputing only the critical layers of tries.

    A row scorer for :class:`~lm_eval_c3po.score.loss.ChoiceLoss`: same rows,
    values and gradients as :class:`~lm_eval_c3po.score.full_rows.FullRowScorer`
    (see the module docstring). Chunks hold as many trie nodes as ``max_rows``
    full rows would hold tokens. Examples are prepared on first use and kept
    in ``cache``, so a reference retrieved for several test contexts is
    prepared once. Only for models on the prefix-cached path
    (:func:`fast_path_applies`).
    """

    def __init__(self, model, routing: RoutingController, layer_ids: Sequence[int], tokens: str,
                 examples: Sequence[Sequence[Example]], max_length: int, max_rows: int = CHUNK_ROWS,
                 cache: PrefixCache | None = None, softmax_dtype: torch.dtype | None = None):
        if not fast_path_applies(model, routing, layer_ids, max_length):
            raise ValueError("scoring from prepared tries needs a model on the prefix-cached path "
                             "(see fast_path_applies); use FullRowScorer")
        self.model, self.routing, self.layer_ids, self.tokens = model, routing, list(layer_ids), tokens
        self.examples, self.max_length, self.budget_rows = examples, max_length, max_rows
        self.softmax_dtype = softmax_dtype
        self.rows = layout_rows(examples, max_length)
        self.row_index = {row.key: n for n, row in enumerate(self.rows)}
        self.device = input_device(model)
        self.cache = cache if cache is not None else PrefixCache()
        self.d0 = FirstCriticalLayer.find(model, routing, self.layer_ids)
        self._batch: TrieBatch | None = None

    def __call__(self, omega: torch.Tensor, per: int) -> torch.Tensor:
        """``[per * rows]``: row r's answer log-likelihood under pathway ``omega[b * per + g]`` at ``g * rows + r``."""
        return self.trie_batch().log_likelihoods(self, omega, per)[0]

    def trie_batch(self) -> TrieBatch:
        """Every example prepared (or fetched from the cache) and laid out for batched calls; built once."""
        if self._batch is None:
            self._batch = self._assemble()
        return self._batch

    # -- scoring the examples themselves (lm-eval's test contexts) ------------

    def own_routing(self) -> torch.Tensor:
        """Each context's own routing ``[B, L_crit, E]`` at its last context token (no override).

        Read from the pass over its first choice's trie, so scoring the choices
        afterwards (:meth:`row_scores`) reuses this pass's prefix instead of
        running the context again.
        """
        with torch.no_grad():
            return self.trie_batch().own_routing(self)

    def row_scores(self, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """lm-eval's ``(log-likelihood, is_greedy)`` of every row with context b's ``omega[b]`` written in.

        Rows are in ``self.rows`` order: (context, example, choice).
        """
        with torch.no_grad():
            return self.trie_batch().log_likelihoods(self, omega, 1, greedy=True)

    # -- preparation ----------------------------------------------------------

    def key(self, example: Example) -> tuple:
        """The cache key of a prepared example: its tokens and everything that shapes its rows."""
        choices = tuple(tuple(int(t) for t in c) for c in example.choices)
        return tuple(int(t) for t in example.context), choices, self.max_length, self.tokens, self.d0.decoder

    def _assemble(self) -> TrieBatch:
        wanted: dict[tuple, tuple[int, int]] = {}
        for b, items in enumerate(self.examples):
            for i, example in enumerate(items):
                wanted.setdefault(self.key(example), (b, i))
        entries: dict[tuple, PreparedNeighbour] = {}
        missing = []
        for key in wanted:
            entry = self.cache.get(key)
            if entry is None:
                missing.append(key)
            else:
                entries[key] = entry
        if missing:
            skeletons = [build_tries(self._rows_of(*wanted[key]), self.tokens) for key in missing]
            with torch.no_grad():
                prepared = prepare(self.model, self.d0, skeletons, self.budget_rows * self.full_width)
            for key, entry in zip(missing, prepared):
                self.cache.put(key, entry)
                self.cache.prepared += 1
                entries[key] = entry
        return TrieBatch.build(self, entries)

    @property
    def full_width(self) -> int:
        """The longest unsplit row: ``max_rows`` rows of it are the memory a chunk may take."""
        return max(len(row.tokens) for row in self.rows)

    def _rows_of(self, b: int, i: int) -> list[tuple[list[int], int, Sequence[int]]]:
        """``(tokens, context_len, answer)`` of every choice of example ``(b, i)``."""
        return [(row.tokens, row.context_len, self.examples[b][i].choices[row.choice])
                for row in self.rows if row.owner == b and row.example == i]


@dataclass
class TrieBatch:
    """The tries of one loss object, with their prefixes' keys/values stacked once; sliced per chunk at every call.

    A call with ``per`` pathways per context lays ``per`` copies of a trie side
    by side in one row (copy g at offset ``g * width`` of its chunk), each
    copy with its own pathway written at its overridden nodes.
    """

    tries: list[Trie]
    owner: list[int]  # the context b each trie belongs to
    group: torch.Tensor  # [T] index into kv
    kv: list[KV]  # per layer after d0: [U, heads, P_max, dim] left-padded prefix keys/values
    scored: list[torch.Tensor]  # per trie [S, 3]: (node, target token, row in scorer.rows) per scored token
    own_trie: list[int | None]  # per context: the trie of its first example's first choice (None: no example)
    num_rows: int
    budget_tokens: int
    kv_budget: int  # prefix positions x critical layers a chunk may hold

    @classmethod
    def build(cls, scorer: TrieScorer, entries: dict[tuple, PreparedNeighbour]) -> TrieBatch:
        tries, owner, group, scored, group_kv, own_trie = [], [], [], [], [], []
        groups: dict[tuple[int, int], int] = {}  # (entry, prefix group) -> kv index
        for b, items in enumerate(scorer.examples):
            own_trie.append(None)
            for i, example in enumerate(items):
                entry = entries[scorer.key(example)]
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
                    row = scorer.row_index[(b, i, c)]
                    scored[base + t] += [(node, target, row) for node, target in entry.tries[t].scored[c]]
        layers = len(group_kv[0])  # the layers after d0 (none when d0 is the last layer)
        pad = max(kv[0][0].shape[2] for kv in group_kv) if layers else 0
        kv = [(left_pad([g[j][0] for g in group_kv], pad), left_pad([g[j][1] for g in group_kv], pad))
              for j in range(layers)]
        budget = scorer.budget_rows * scorer.full_width
        scored = [torch.tensor(s, dtype=torch.long).view(-1, 3) for s in scored]
        return cls(tries, owner, torch.tensor(group), kv, scored, own_trie, len(scorer.rows), budget,
                   budget * len(scorer.model.model.layers))

    def chunks(self, per: int) -> list[list[int]]:
        """Tries grouped longest first within the token budget and the prefix keys/values budget."""
        full = self.kv[0][0].shape[2] * len(self.kv) if self.kv else 0
        rows_for_kv = max(1, self.kv_budget // max(full, 1))
        out = []
        for chunk in chunk_by_cost([per * len(t) for t in self.tries], self.budget_tokens):
            out += [chunk[s:s + rows_for_kv] for s in range(0, len(chunk), rows_for_kv)]
        return out

    def run(self, scorer: TrieScorer, chunk: list[int], omega: torch.Tensor | None, per: int,
            trunk_only: bool = False) -> torch.Tensor:
        """Final hidden states ``[n, per * width, H]`` of the tries ``chunk``, copy g with pathway
        ``omega[owner * per + g]`` written in (differentiable) or, for ``None``, the model's own routing.

        ``trunk_only`` runs each trie's trunk alone (:attr:`Trie.trunk_len` nodes), for what needs
        no answer token.
        """
        model, d0 = scorer.model, scorer.d0
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
            return run_after_prefix(model, hidden, kv, prefix_len, depth, visible, *layers)

        # Write each copy's pathway in: at d0 by its linear mix, in later critical layers by the router hooks.
        # omega rows are (slot, critical layer) pairs; each overridden node takes its writer slot's pathway.
        rows, positions, jobs, slots = [], [], [], []
        for row, (n, trie) in enumerate(zip(chunk, picked)):
            for g in range(per):
                rows += [row] * len(trie.overridden)
                positions += [g * width + node for node in trie.overridden]
                jobs += [self.owner[n] * per + g] * len(trie.overridden)
                slots += trie.writer
        by_slot = omega.view(omega.shape[0], -1, len(scorer.layer_ids), omega.shape[-1])
        pathways = by_slot[torch.tensor(jobs, device=omega.device), torch.tensor(slots, device=omega.device)]
        mixed = d0.mix(pathways[:, d0.slot],
                       *(torch.cat([getattr(t, name).repeat(per, *[1] * (getattr(t, name).dim() - 1)) for t in picked])
                         for name in ("logits", "rest", "experts")))
        hidden = hidden.index_put((torch.tensor(rows, device=device), torch.tensor(positions, device=device)),
                                  mixed.to(hidden.dtype))
        if not d0.later_slots:
            return run_after_prefix(model, hidden, kv, prefix_len, depth, visible, *layers)
        width_slots = max(per * len(t.overridden) for t in picked)
        where = torch.full((len(picked), width_slots), -1, dtype=torch.long)
        written = pathways.new_zeros(len(picked), width_slots, len(d0.later_slots), pathways.shape[-1])
        counts = [0] * len(picked)
        for m, (row, position) in enumerate(zip(rows, positions)):
            where[row, counts[row]] = position
            written[row, counts[row]] = pathways[m, list(d0.later_slots)]
            counts[row] += 1
        with scorer.routing.override(where, written, layers=d0.later_layers):
            return run_after_prefix(model, hidden, kv, prefix_len, depth, visible, *layers)

    def own_routing(self, scorer: TrieScorer) -> torch.Tensor:
        """The routing ``[B, P * Lc, E]`` of each context's own trie at its token slots (slot-major rows)."""
        d0 = scorer.d0
        out: dict[int, torch.Tensor] = {}
        if None in self.own_trie:
            raise ValueError("own routing needs at least one example per context")
        wanted = sorted(set(self.own_trie))
        for chunk in chunk_by_cost([self.tries[n].trunk_len for n in wanted], self.budget_tokens):
            chunk = [wanted[n] for n in chunk]
            tries = [self.tries[n] for n in chunk]
            routing = torch.empty(len(chunk), len(tries[0].slot_nodes), len(scorer.layer_ids),
                                  scorer.routing.num_experts)
            logits = torch.stack([t.logits[t.slot_index] for t in tries])  # [n, P, E]
            routing[:, :, d0.slot] = d0.layer.adapter.distribution(d0.layer.router, logits).float().cpu()
            if d0.later_slots:
                nodes = torch.tensor([t.slot_nodes for t in tries])
                with scorer.routing.capture(nodes, layers=d0.later_layers) as cap:
                    self.run(scorer, chunk, None, 1, trunk_only=True)
                routing[:, :, list(d0.later_slots)] = cap.routing.float()
            out.update(zip(chunk, routing.flatten(1, 2)))
        return torch.stack([out[n] for n in self.own_trie])

    def log_likelihoods(self, scorer: TrieScorer, omega: torch.Tensor, per: int, greedy: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Summed answer log-likelihood ``[per * rows]`` (job ``g * rows + r``: row r of ``scorer.rows``
        under pathway ``omega[b * per + g]``) and, with ``greedy``, lm-eval's is-greedy flag.

        Only the scored nodes reach the (vocabulary-wide) head. The log-softmax and the sums run in
        HFLM's precision (its ``softmax_dtype``, else the logits' dtype), returned as float32.
        """
        model = scorer.model
        ll = None
        missed = torch.zeros(per * self.num_rows, device=scorer.device)
        for chunk in self.chunks(per):
            hidden = self.run(scorer, chunk, omega, per)
            width = hidden.shape[1] // per
            scored = torch.cat([self.scored[n] for n in chunk])  # [S, 3]
            rows = torch.repeat_interleave(torch.arange(len(chunk)), torch.tensor([len(self.scored[n]) for n in chunk]))
            copies = torch.arange(per).unsqueeze(1)  # every scored token once per copy g
            rows = rows.expand(per, -1).reshape(-1).to(hidden.device)
            nodes = (copies * width + scored[:, 0]).reshape(-1).to(hidden.device)
            targets_t = scored[:, 1].expand(per, -1).reshape(-1).to(hidden.device)
            jobs_t = (copies * self.num_rows + scored[:, 2]).reshape(-1).to(scorer.device)
            logits = model.lm_head(model.model.norm(hidden[rows, nodes]))
            token_ll = answer_log_probs(logits, targets_t, scorer.softmax_dtype)
            if ll is None:
                ll = token_ll.new_zeros(per * self.num_rows, device=scorer.device)
            ll = ll.index_add(0, jobs_t, token_ll.to(ll.device))
            if greedy:
                missed.index_add_(0, jobs_t, (logits.argmax(-1) != targets_t).float().to(missed.device))
        return ll.float(), (missed == 0).cpu() if greedy else None

