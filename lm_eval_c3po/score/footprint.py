"""How many bytes a neighbourhood-loss call holds, estimated before it runs.

A re-mixing method's memory grows with its batch: NGD keeps the autograd
graph of every trie node of every context until the backward pass, kernel
regression runs its alpha grid as copies of each trie side by side. The
prepared-prefix LRU is byte-bounded; this is what bounds the rest, so that a
remix batch can be split before it runs out of memory
(:func:`~lm_eval_c3po.remix.memory.split_by_bytes`).

The estimate is meant as an upper bound, built from the model's own shapes, per trie of
``w`` nodes after a prefix of ``p`` tokens, ``s`` scored answer tokens,
``per`` candidate copies and ``layers`` decoder layers after the first
critical one (:class:`~lm_eval_c3po.score.first_layer.FirstCriticalLayer`).
A call runs its tries in chunks of :data:`~lm_eval_c3po.score.packing.CHUNK_ROWS`
rows' worth of tokens, so it has two parts:

- *held* for the whole call: the batch's stacked prefix keys/values and, under
  autograd, everything the backward pass reads (below, for every layer);
- the *working set* of one chunk: without autograd only the largest chunk's
  counts, as chunks run one after another;

where a chunk's tries cost their activations (every linear map a node passes
through keeps its input and output, the experts' only for the ``top_k`` a
token is routed to), attention scores and probabilities ``heads x per*w x
(p + per*w)``, their gathered prefix keys/values joined with the nodes' own,
``per * s`` vocabulary-wide logits (in the model's dtype and as
log-probabilities in HFLM's ``softmax_dtype``) and the first critical layer's routed experts at the
overridden nodes, one copy per candidate.

Checked against the bytes autograd actually keeps and the profiler's peak of a
tiny model's loss calls (``tests/test_footprint.py``), and against the peaks of
OLMoE-1B-7B-sized calls in bfloat16 (``benchmarks/footprint_check.py``: 1.9-2.0x
NGD's, 2.4-3.7x kernel regression's; README, Speed). It overestimates on purpose:
too high costs a few more parts, too low an out-of-memory error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lm_eval_c3po.routing import RoutingController
from lm_eval_c3po.score.examples import Example, layout_rows
from lm_eval_c3po.score.first_layer import FirstCriticalLayer
from lm_eval_c3po.score.loss import gold_only
from lm_eval_c3po.score.packing import CHUNK_ROWS
from lm_eval_c3po.score.trie_scorer import fast_path_applies
from lm_eval_c3po.score.tries import build_tries

# Activations per linear input/output element of a node. Under autograd every intermediate is kept: the
# linear maps' own inputs and outputs plus the norms, residual sums, activation functions and dtype casts
# around them; 3 keeps the estimate above what autograd keeps for every tiny family (tests/test_footprint.py).
# Without it a layer's intermediates are freed as the next ones form, so 1 bounds the working set (measured
# peaks in benchmarks/footprint_check.py).
SAVED_FACTOR = 3.0
WORKING_FACTOR = 1.0


@dataclass(frozen=True)
class Footprint:
    """Bytes of a loss call over some tries (see the module docstring); adds up over contexts."""

    held: int = 0  # kept for the whole call, besides the stacked prefixes
    working: int = 0  # the working set if every trie ran in one chunk
    tokens: int = 0  # trie nodes x candidate copies, what a chunk's budget counts
    width: int = 0  # the longest unsplit row, which sets the chunk budget
    prefixes: int = 0  # prefixes stacked, each left-padded to the longest
    prefix: int = 0  # the longest prefix
    prefix_bytes: int = 0  # keys and values of one prefix position over the layers a call runs

    def __add__(self, other: Footprint) -> Footprint:
        return Footprint(self.held + other.held, self.working + other.working, self.tokens + other.tokens,
                         max(self.width, other.width), self.prefixes + other.prefixes,
                         max(self.prefix, other.prefix), max(self.prefix_bytes, other.prefix_bytes))

    @property
    def bytes(self) -> int:
        """The held bytes, the stacked prefixes and the working set of the largest chunk the scorer can form
        (``CHUNK_ROWS`` longest rows' worth of tokens), at most all of it."""
        chunk = self.working / max(self.tokens, 1) * CHUNK_ROWS * self.width
        return int(self.held + self.prefixes * self.prefix * self.prefix_bytes + min(self.working, chunk))


@dataclass(frozen=True)
class TrieSize:
    """One trie of a loss call: its prefix tokens, its nodes and its scored answer tokens."""

    prefix: int
    nodes: int
    scored: int
    width: int  # its example's longest unsplit row


@dataclass(frozen=True)
class LossShape:
    """The per-unit sizes of a model's loss calls (see the module docstring), in bytes."""

    layers: int  # decoder layers a loss call runs (after the first critical one)
    node_bytes: int  # one node's linear inputs and outputs in one layer
    kv_bytes: int  # keys and values of one position in one layer
    heads: int
    vocab: int
    logit_bytes: int  # one vocabulary entry of a scored token: the head's output and its log-softmax
    expert_bytes: int  # every routed expert's output at one overridden node (first critical layer)
    dtype_bytes: int
    cached: bool = True  # the prefix-cached scorer's tries, or the reference scorer's whole rows

    @classmethod
    def of(cls, model, routing: RoutingController, layer_ids: Sequence[int], max_length: int,
           softmax_dtype: torch.dtype | None = None) -> LossShape:
        """The shape of ``model``'s loss calls on the scorer :func:`~lm_eval_c3po.score.loss.choice_loss` picks
        (prefix-cached tries, or the reference scorer's whole rows through every layer); the log-softmax in
        ``softmax_dtype`` (None: the model's)."""
        decoders = list(model.model.layers)
        cached = fast_path_applies(model, routing, layer_ids, max_length)
        d0 = FirstCriticalLayer.find(model, routing, layer_ids) if cached else None
        later = decoders[d0.decoder + 1:] if d0 is not None else decoders
        config = model.config
        dtype_bytes = next(model.parameters()).element_size()
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        return cls(
            layers=len(later),
            node_bytes=max((linear_elements(layer, routing.top_k, routing.num_experts) for layer in later),
                           default=0) * dtype_bytes,
            kv_bytes=2 * kv_heads * max(head_dim, getattr(config, "v_head_dim", 0) or 0) * dtype_bytes,
            heads=heads,
            vocab=int(config.vocab_size),
            logit_bytes=dtype_bytes + (softmax_dtype.itemsize if softmax_dtype is not None else dtype_bytes),
            expert_bytes=routing.num_experts * int(config.hidden_size) * dtype_bytes if d0 is not None else 0,
            dtype_bytes=dtype_bytes,
            cached=d0 is not None,
        )

    def call(self, examples: Sequence[Example], max_length: int, tokens: str, objective: str, per: int,
             grad: bool) -> Footprint:
        """One context's share of a loss call over its ``examples`` (its neighbours, or itself for the oracle)."""
        sizes = trie_sizes(examples, max_length, tokens, objective, self.cached)
        return sum((self.footprint(t, per, grad) for t in sizes), Footprint())

    def footprint(self, trie: TrieSize, per: int, grad: bool) -> Footprint:
        """One trie with ``per`` candidate copies, under autograd (``grad``) or not."""
        width = per * trie.nodes
        keys = trie.prefix + width
        attention = 2 * self.heads * width * keys * self.dtype_bytes
        rest = (2 * self.layers * self.kv_bytes * keys  # gathered prefix keys/values joined with the nodes'
                + per * trie.scored * self.vocab * self.logit_bytes + per * self.expert_bytes)
        working = WORKING_FACTOR * width * self.node_bytes + attention
        stacked = {"prefixes": 1, "prefix": trie.prefix, "prefix_bytes": self.layers * self.kv_bytes}
        if grad:  # the backward pass reads every layer: all of it is held, one layer's gradients work
            held = self.layers * (SAVED_FACTOR * width * self.node_bytes + attention) + rest
            return Footprint(int(held), int(working), width, trie.width, **stacked)
        return Footprint(0, int(working + rest), width, trie.width, **stacked)


def linear_elements(layer: torch.nn.Module, top_k: int, num_experts: int) -> int:
    """Input plus output elements per token of the linear maps in ``layer`` (routed experts: ``top_k`` of them).

    Stacked expert weights ``[E, out, in]`` count once per routed expert; a list of per-expert linear
    modules counts ``top_k / E`` of its total. Vectors (norms, biases) count their length.
    """
    total = 0.0
    for name, weight in layer.named_parameters():
        routed = ".experts." in f".{name}" and "shared" not in name
        if weight.dim() == 3:
            total += top_k * (weight.shape[1] + weight.shape[2])
        elif weight.dim() == 2:
            total += (weight.shape[0] + weight.shape[1]) * (top_k / num_experts if routed else 1)
        elif not name.endswith("bias"):
            total += weight.numel()
    return int(total)


def trie_sizes(examples: Sequence[Example], max_length: int, tokens: str, objective: str = "choices",
               cached: bool = True) -> list[TrieSize]:
    """The tries a loss call over ``examples`` (one context's neighbours) builds, without preparing them; on
    the reference scorer (not ``cached``) every choice is a whole row of its own."""
    scored = gold_only([examples])[0] if objective == "gold" else list(examples)
    rows = layout_rows([scored], max_length)
    if not cached:
        return [TrieSize(0, len(row.tokens), row.answer_len, len(row.tokens)) for row in rows]
    out = []
    for i, example in enumerate(scored):
        own = [(row.tokens, row.context_len, example.choices[row.choice]) for row in rows if row.example == i]
        _, tries, _ = build_tries(own, tokens)
        width = max(len(whole) for whole, _, _ in own)
        out += [TrieSize(t.prefix_len, len(t.tokens), sum(len(s) for s in t.scored.values()), width) for t in tries]
    return out
