"""The neighbourhood loss of NGD / kernel regression at the cost of a few suffix tokens.

:class:`~lm_eval_c3po.remix.ChoiceLoss` runs the whole model on every
(context, neighbour, choice) row at every call: 11 full passes per NGD run.
But omega only changes the routing at the neighbour's overridden context
token(s) and only in the critical layers, and attention is causal, so for a
row split at its first overridden position ``p0``:

- every layer's keys/values of the *prefix* ``row[:p0]`` are independent of
  omega, and the prefix is shared by all choices of a neighbour;
- every layer below the first critical decoder layer ``d0`` is independent
  of omega at every position.

So a neighbour is *prepared* once (no grad): one pass of the model over its
prefix (keeping the key/value cache), then the layers below ``d0`` over each
choice's suffix ``row[p0:]`` attending to that cache, keeping the hidden
state entering ``d0``. A loss call then runs only layers ``d0..`` over the
suffixes (the overridden token(s) and the answer tokens) with the prefix
keys/values of those layers, using the model's own decoder layers, rotary
embedding, :class:`~transformers.DynamicCache` and causal mask. Prepared
neighbours live in a bounded LRU (:class:`PrefixCache`) that a Remixer shares
across its loss objects, so a reference that is a neighbour of several test
contexts is prepared once.

The same machinery scores lm-eval's test contexts (:meth:`CachedChoiceLoss.own_routing`,
:meth:`CachedChoiceLoss.row_scores`): one prepared pass per context yields its own
pathway (the routing at its last token, no override) and, once omega* is
known, the log-likelihood of every choice at the cost of its suffix. Rows
whose suffix is a leading run of another row's (single-token answers: every
choice's suffix is just the last context token) are read off that row's pass.

Batches put every row's prefix at the *left* of the key axis (left padding,
as in generation) and its suffix after it, so transformers' standard
2-D-padding causal mask applies unchanged.

Families whose forward differs from the plain ``embed -> layers -> norm ->
lm_head`` loop (e.g. GraniteMoE's multipliers, PhiMoE's long-rope scaling),
and sliding-window attention narrower than the rows, fall back to the
reference :class:`ChoiceLoss` (logged once per family).
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from lm_eval_c3po.remix import ChoiceLoss, Example
from lm_eval_c3po.routing import RoutingController, input_device, token_positions

logger = logging.getLogger(__name__)

# Families whose CausalLM forward is exactly embed -> decoder layers (one causal mask) -> norm -> lm_head,
# checked against the reference loss in tests/test_cached_loss.py.
FAST_FAMILIES = frozenset({"olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3"})
DEFAULT_CACHE_BYTES = 1 << 30
_warned: set[str] = set()

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class PreparedNeighbour:
    """One reference example, ready for suffix-only loss calls.

    ``prefix_kv[g][j]`` holds the keys/values (``[1, heads, p, dim]``) of prefix
    group ``g`` in decoder layer ``d0 + j``; ``rows[c] = (g, p0, hidden)``
    gives choice c's prefix group, split position and the hidden state
    ``[S, H]`` entering layer ``d0`` at its suffix positions.
    """

    prefix_kv: list[list[KV]]
    rows: list[tuple[int, int, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        tensors = [t for group in self.prefix_kv for kv in group for t in kv] + [h for _, _, h in self.rows]
        return sum(t.numel() * t.element_size() for t in tensors)


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
    """Whether the suffix-only recomputation reproduces ``model``'s forward; logs the reason once if not."""
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
    elif window is not None and window < max_length:
        reason = f"sliding-window attention ({window}) is narrower than max_length ({max_length})"
    if reason is not None and family not in _warned:
        _warned.add(family)
        logger.info("c3po: neighbourhood loss without prefix caching for %s: %s", family, reason)
    return reason is None


class CachedChoiceLoss(ChoiceLoss):
    """:class:`ChoiceLoss` (same arguments, values and gradients) recomputing only critical-layer suffixes.

    The parent builds the rows and turns per-row log-likelihoods into the
    kernel-weighted choice cross-entropy; this class replaces only how the
    log-likelihoods are computed (see the module docstring). The parent's
    ``max_rows`` chunking is replaced by a token budget: a chunk holds as many
    suffix rows as ``max_rows`` full rows would hold tokens.
    """

    def __init__(self, model, routing, layer_ids, tokens, examples, weights, max_length, max_rows: int = 64,
                 cache: PrefixCache | None = None):
        super().__init__(model, routing, layer_ids, tokens, examples, weights, max_length, max_rows)
        self._budget_rows = max_rows
        self.max_rows = sys.maxsize  # the parent hands every job to _log_likelihoods, which chunks them
        self._cache = cache if cache is not None else PrefixCache()
        self._fast = fast_path_applies(model, routing, self.layer_ids, max_length)
        self._max_length = max_length
        self._index = {row[:3]: n for n, row in enumerate(self._rows)}
        self._batch: _SuffixBatch | None = None

    def _suffix_batch(self) -> _SuffixBatch:
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
        rows = torch.tensor([self._index[row[:3]] for _, row in jobs], dtype=torch.long)
        owner = torch.tensor([row[0] * per + g for g, row in jobs], dtype=torch.long)
        return self._scores(rows, owner, flat)[0]

    # -- scoring the examples themselves (lm-eval's test contexts) ------------

    def own_routing(self) -> torch.Tensor:
        """Each context's own routing ``[B, L_crit, E]`` at its last context token (no override).

        Read from the first choice's prepared suffix, so scoring the choices
        afterwards (:meth:`row_scores`) reuses this pass's prefix instead of
        running the context again.
        """
        self._require_fast()
        first = torch.tensor([self._index[(b, 0, 0)] for b in range(len(self.examples))], dtype=torch.long)
        with torch.no_grad():
            return self._suffix_batch().own_routing(self, first)

    def row_scores(self, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """lm-eval's ``(log-likelihood, is_greedy)`` of every row with context b's ``omega[b]`` written in.

        Rows are in ``self._rows`` order: (context, example, choice).
        """
        self._require_fast()
        rows = torch.arange(len(self._rows))
        owner = torch.tensor([row[0] for row in self._rows], dtype=torch.long)
        with torch.no_grad():
            return self._scores(rows, owner, omega, greedy=True)

    def _require_fast(self) -> None:
        if not self._fast:
            raise RuntimeError("scoring from prepared suffixes needs a model on the prefix-cached path")

    def _scores(self, rows: torch.Tensor, owner: torch.Tensor, flat: torch.Tensor, greedy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-likelihood (and greedy flag) of ``rows`` under pathway ``flat[owner]``.

        Rows whose suffix is a prefix of another row's (same prefix, same
        pathway) are read off that row's pass: with single-token answers all
        choices of a context share one row.
        """
        batch = self._suffix_batch()
        total = len(batch.suffix_len)
        compute = batch.compute_row[rows]
        unique, member_of = torch.unique(owner * total + compute, return_inverse=True)
        u_owner, u_row = unique // total, unique % total
        order = torch.argsort(batch.suffix_len[u_row], descending=True, stable=True)
        ll = flat.new_zeros(len(rows), dtype=torch.float32)
        is_greedy = torch.zeros(len(rows), dtype=torch.bool) if greedy else None
        start = 0
        while start < len(order):
            width = int(batch.suffix_len[u_row[order[start]]])
            take = order[start:start + batch.rows_per_chunk(self._budget_rows, width, len(self.model.model.layers))]
            hidden = batch.run(self, u_row[take], flat[u_owner[take]])
            slot = torch.full((len(unique),), -1, dtype=torch.long)
            slot[take] = torch.arange(len(take))
            members = (slot[member_of] >= 0).nonzero().squeeze(1)
            part_ll, part_greedy = batch.answers(self, hidden, slot[member_of[members]], rows[members])
            ll = ll.index_put((members.to(ll.device),), part_ll)
            if is_greedy is not None:
                is_greedy[members] = part_greedy.cpu()
            start += len(take)
        return ll, is_greedy

    # -- preparation ----------------------------------------------------------

    @property
    def _first(self) -> int:
        return min(self.routing.layers[i].decoder_layer for i in self.layer_ids)

    def _key(self, example: Example) -> tuple:
        choices = tuple(tuple(int(t) for t in c) for c in example.choices)
        return tuple(int(t) for t in example.context), choices, self._max_length, self.tokens, self._first

    def _assemble(self) -> _SuffixBatch:
        """Prepare (or fetch) every neighbour of this loss and lay their rows out as padded tensors."""
        wanted: dict[tuple, tuple[int, int]] = {}
        for b, items in enumerate(self.examples):
            for i, example in enumerate(items):
                wanted.setdefault(self._key(example), (b, i))
        entries: dict[tuple, PreparedNeighbour] = {}
        missing = []
        for key, at in wanted.items():
            entry = self._cache.get(key)
            if entry is None:
                missing.append((key, at))
            else:
                entries[key] = entry
        if missing:
            with torch.no_grad():
                prepared = _prepare(self.model, self._first, [self._rows_of(*at) for _, at in missing],
                                    self._budget_rows)
            for (key, _), entry in zip(missing, prepared):
                self._cache.put(key, entry)
                self._cache.prepared += 1
                entries[key] = entry
        return _SuffixBatch.build(self, entries)

    def _rows_of(self, b: int, i: int) -> list[tuple[list[int], int]]:
        """(row tokens, first overridden position) of every choice of example ``(b, i)``."""
        out = []
        for row in self._rows:
            if row[0] == b and row[1] == i:
                out.append((row[3], int(token_positions(self.tokens, [row[4]]).min())))
        return out


def _left_pad(tensors: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Stack ``[1, heads, p_n, dim]`` tensors into ``[N, heads, width, dim]``, each right-aligned."""
    first = tensors[0]
    out = first.new_zeros(len(tensors), first.shape[1], width, first.shape[3])
    for n, t in enumerate(tensors):
        if t.shape[2]:
            out[n, :, width - t.shape[2]:] = t[0]
    return out


def _run_layers(model, hidden: torch.Tensor, prefix_kv: list[KV], prefix_len: torch.Tensor, first: int,
                last: int) -> torch.Tensor:
    """Decoder layers ``first..last-1`` over suffix ``hidden [N, S, H]`` after left-padded prefixes.

    ``prefix_kv[j]`` are layer ``first + j``'s keys/values ``[N, heads, P, dim]``
    with row n's ``prefix_len[n]`` real positions at the right end; the
    suffix's position ids continue from there, so rotary phases match the
    unsplit row.
    """
    if first == last:
        return hidden
    inner = model.model
    rows, width = hidden.shape[:2]
    device = hidden.device
    pad = prefix_kv[0][0].shape[2]
    prefix_len = prefix_len.to(device)
    cache = DynamicCache(ddp_cache_data=[(None, None)] * first + list(prefix_kv))
    mask_2d = torch.cat(
        [torch.arange(pad, device=device).unsqueeze(0) >= (pad - prefix_len).unsqueeze(1),
         torch.ones(rows, width, dtype=torch.bool, device=device)], dim=1)
    position_ids = prefix_len.unsqueeze(1) + torch.arange(width, device=device).unsqueeze(0)
    mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=mask_2d,
                              past_key_values=cache, position_ids=position_ids, layer_idx=first)
    position_embeddings = inner.rotary_emb(hidden, position_ids)
    for layer in inner.layers[first:last]:
        hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                       use_cache=True, position_embeddings=position_embeddings)
    return hidden


def _prepare(model, first: int, examples: list[list[tuple[list[int], int]]], budget_rows: int
             ) -> list[PreparedNeighbour]:
    """Prefix passes (every layer, with cache) and below-``first`` suffix passes for ``examples``.

    ``examples[e]`` lists (row tokens, split position) per choice. Prefixes are
    deduplicated (choices of one neighbour share theirs unless truncation
    shifted them), then everything runs in right-padded batches of at most
    ``budget_rows`` rows.
    """
    inner = model.model
    device = input_device(model)
    num_layers = len(inner.layers)
    prefixes: dict[tuple[int, ...], int] = {}
    for rows in examples:
        for tokens, p0 in rows:
            prefixes.setdefault(tuple(tokens[:p0]), len(prefixes))
    keys = list(prefixes)
    prefix_kv: list[list[KV]] = [[] for _ in keys]  # every layer, for the lower suffix pass
    for start in range(0, len(keys), budget_rows):
        chunk = keys[start:start + budget_rows]
        width = max(map(len, chunk))
        if width == 0:
            for n, _ in enumerate(chunk):
                empty = _empty_kv(model, num_layers, device)
                prefix_kv[start + n] = empty
            continue
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        for n, key in enumerate(chunk):
            ids[n, : len(key)] = torch.tensor(key, dtype=torch.long)
        cache = inner(input_ids=ids.to(device), use_cache=True).past_key_values
        for n, key in enumerate(chunk):
            prefix_kv[start + n] = [
                (cache.layers[j].keys[n:n + 1, :, : len(key)].clone(),
                 cache.layers[j].values[n:n + 1, :, : len(key)].clone())
                for j in range(num_layers)
            ]

    flat = [(e, c, tokens, p0) for e, rows in enumerate(examples) for c, (tokens, p0) in enumerate(rows)]
    hidden_of: dict[tuple[int, int], torch.Tensor] = {}
    for start in range(0, len(flat), budget_rows):
        chunk = flat[start:start + budget_rows]
        width = max(len(tokens) - p0 for _, _, tokens, p0 in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        groups = [prefixes[tuple(tokens[:p0])] for _, _, tokens, p0 in chunk]
        for n, (_, _, tokens, p0) in enumerate(chunk):
            ids[n, : len(tokens) - p0] = torch.tensor(tokens[p0:], dtype=torch.long)
        hidden = inner.embed_tokens(ids.to(device))
        if first:
            pad = max(len(keys[g]) for g in groups)
            kv = [(_left_pad([prefix_kv[g][j][0] for g in groups], pad),
                   _left_pad([prefix_kv[g][j][1] for g in groups], pad)) for j in range(first)]
            lengths = torch.tensor([len(keys[g]) for g in groups])
            hidden = _run_layers(model, hidden, kv, lengths, 0, first)
        for n, (e, c, tokens, p0) in enumerate(chunk):
            hidden_of[(e, c)] = hidden[n, : len(tokens) - p0].clone()

    out = []
    for e, rows in enumerate(examples):
        local: dict[int, int] = {}
        kept: list[list[KV]] = []
        prepared_rows = []
        for c, (tokens, p0) in enumerate(rows):
            g = prefixes[tuple(tokens[:p0])]
            if g not in local:
                local[g] = len(kept)
                kept.append(prefix_kv[g][first:])
            prepared_rows.append((local[g], p0, hidden_of[(e, c)]))
        out.append(PreparedNeighbour(kept, prepared_rows))
    return out


def _empty_kv(model, num_layers: int, device) -> list[KV]:
    """Zero-length keys/values per layer for a row whose first token is overridden (shapes from a 1-token pass)."""
    cache = model.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True).past_key_values
    return [(cache.layers[j].keys[:, :, :0].clone(), cache.layers[j].values[:, :, :0].clone())
            for j in range(num_layers)]


@dataclass
class _SuffixBatch:
    """The rows of one loss object as padded tensors, built once and sliced per chunk at every call."""

    hidden: torch.Tensor  # [R, S_max, H] hidden state entering d0 at suffix positions (right-padded)
    suffix_len: torch.Tensor  # [R]
    prefix_len: torch.Tensor  # [R] = first overridden position p0
    group: torch.Tensor  # [R] index into the prefix groups of kv
    kv: list[KV]  # per layer d0..: [U, heads, P_max, dim] left-padded prefix keys/values
    positions: torch.Tensor  # [R, P] overridden positions, in suffix coordinates
    last_context: torch.Tensor  # [R] the last context token, in suffix coordinates
    compute_row: torch.Tensor  # [R] the row whose pass also yields this row's (see _compute_rows)
    score_start: torch.Tensor  # [R] first scored token of each row in score_pos / targets
    score_count: torch.Tensor  # [R] its number of answer tokens
    score_pos: torch.Tensor  # [T] position of each scored token, in suffix coordinates
    targets: torch.Tensor  # [T] the answer token it predicts
    full_width: int  # the longest unsplit row (the naive path's chunk width)

    @classmethod
    def build(cls, loss: CachedChoiceLoss, entries: dict[tuple, PreparedNeighbour]) -> _SuffixBatch:
        device = loss.device
        group_ids: dict[tuple[int, int], int] = {}
        group_kv: list[list[KV]] = []
        hidden, suffix_len, prefix_len, group, positions = [], [], [], [], []
        score_pos, targets, last_context, suffixes = [], [], [], []
        entry_ids = {}
        for b, i, c, whole, ctx_len, cont_len in loss._rows:
            example = loss.examples[b][i]
            key = loss._key(example)
            entry = entries[key]
            entry_ids.setdefault(key, len(entry_ids))
            g, p0, h = entry.rows[c]
            gid = group_ids.setdefault((entry_ids[key], g), len(group_kv))
            if gid == len(group_kv):
                group_kv.append(entry.prefix_kv[g])
            hidden.append(h)
            suffix_len.append(h.shape[0])
            prefix_len.append(p0)
            group.append(gid)
            positions.append(token_positions(loss.tokens, [ctx_len])[0] - p0)
            start = ctx_len - 1 - p0
            last_context.append(start)
            suffixes.append((gid, tuple(positions[-1].tolist()), tuple(whole[p0:])))
            score_pos += range(start, start + cont_len)
            targets += [int(t) for t in example.choices[c]]
        width = max(suffix_len)
        padded = hidden[0].new_zeros(len(hidden), width, hidden[0].shape[-1])
        for n, h in enumerate(hidden):
            padded[n, : h.shape[0]] = h
        pad = max(prefix_len)
        layers = len(group_kv[0])
        kv = [(_left_pad([g[j][0] for g in group_kv], pad), _left_pad([g[j][1] for g in group_kv], pad))
              for j in range(layers)]
        counts = torch.tensor([row[5] for row in loss._rows])
        return cls(
            hidden=padded, suffix_len=torch.tensor(suffix_len), prefix_len=torch.tensor(prefix_len),
            group=torch.tensor(group), kv=kv, positions=torch.stack(positions),
            last_context=torch.tensor(last_context), compute_row=_compute_rows(suffixes),
            score_count=counts, score_start=counts.cumsum(0) - counts,
            score_pos=torch.tensor(score_pos, device=device),
            targets=torch.tensor(targets, device=device), full_width=max(len(row[3]) for row in loss._rows),
        )

    def rows_per_chunk(self, budget_rows: int, width: int, num_layers: int) -> int:
        """As many suffix rows as ``budget_rows`` full rows hold in activations and in keys/values."""
        tokens = budget_rows * self.full_width
        kv_rows = tokens * num_layers // max(self.kv[0][0].shape[2] * len(self.kv), 1)
        return max(1, min(tokens // max(width, 1), kv_rows))

    def run(self, loss: CachedChoiceLoss, rows: torch.Tensor, omega: torch.Tensor | None) -> torch.Tensor:
        """Final hidden states ``[n, S, H]`` of ``rows`` through the critical layers, with ``omega [n, Lc, E]``
        written in (differentiable) or, for ``None``, the model's own routing."""
        model = loss.model
        width = int(self.suffix_len[rows].max())
        pad = int(self.prefix_len[rows].max())
        full = self.kv[0][0].shape[2]
        groups = self.group[rows].to(self.hidden.device)
        kv = [(k.index_select(0, groups)[:, :, full - pad:], v.index_select(0, groups)[:, :, full - pad:])
              for k, v in self.kv]
        hidden = self.hidden.index_select(0, rows.to(self.hidden.device))[:, :width]
        layers = (loss._first, len(model.model.layers))
        if omega is None:
            return _run_layers(model, hidden, kv, self.prefix_len[rows], *layers)
        positions = self.positions[rows]
        omega = omega.unsqueeze(1).expand(-1, positions.shape[1], -1, -1)
        with loss.routing.override(positions, omega, layers=loss.layer_ids):
            return _run_layers(model, hidden, kv, self.prefix_len[rows], *layers)

    def own_routing(self, loss: CachedChoiceLoss, rows: torch.Tensor) -> torch.Tensor:
        """The routing ``[n, Lc, E]`` of ``rows`` at their last context token, captured from :meth:`run`."""
        with loss.routing.capture(self.last_context[rows].unsqueeze(1), layers=loss.layer_ids) as cap:
            self.run(loss, rows, None)
        return cap.routing[:, 0].float()

    def answers(self, loss: CachedChoiceLoss, hidden: torch.Tensor, local: torch.Tensor, rows: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed answer log-likelihood and lm-eval's greedy flag of ``rows``, read from ``hidden[local]``.

        Only the answer positions reach the (vocabulary-wide) head.
        """
        model = loss.model
        device = hidden.device
        counts = self.score_count[rows].to(device)
        which = torch.repeat_interleave(torch.arange(len(rows), device=device), counts)
        within = torch.arange(len(which), device=device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        token = self.score_start[rows].to(device).repeat_interleave(counts) + within
        states = model.model.norm(hidden[local.to(device)[which], self.score_pos[token]])
        logits = model.lm_head(states).float()
        targets = self.targets[token]
        token_ll = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        missed = torch.zeros(len(rows), device=device).index_add(0, which, (logits.argmax(-1) != targets).float())
        return torch.zeros(len(rows), device=device).index_add(0, which, token_ll), missed == 0


def _compute_rows(suffixes: Sequence[tuple[int, tuple[int, ...], tuple[int, ...]]]) -> torch.Tensor:
    """For each row, a row with the same prefix group and overridden positions whose suffix starts with
    this row's suffix: attention is causal, so that row's pass holds this row's hidden states too."""
    order = sorted(range(len(suffixes)), key=lambda r: -len(suffixes[r][2]))
    found: dict[tuple, int] = {}  # (group, positions, a leading run of some suffix) -> that suffix's row
    out = torch.empty(len(suffixes), dtype=torch.long)
    for r in order:
        group, positions, tokens = suffixes[r]
        key = (group, positions, tokens)
        out[r] = found.setdefault(key, r)
        for end in range(1, len(tokens)):
            found.setdefault((group, positions, tokens[:end]), int(out[r]))
    return out
