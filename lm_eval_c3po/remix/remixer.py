"""Test-time re-mixing: from test contexts to their pathways omega*.

For a batch of test contexts the :class:`Remixer`
1. reads each context's own pathway (the routing of its last context token
   in the critical layers),
2. retrieves similar reference questions the model answered correctly
   (:class:`~lm_eval_c3po.retrieve.Retriever`),
3. runs the configured method (:data:`~lm_eval_c3po.remix.methods.METHODS`),
   whose neighbourhood loss, if it needs one, scores the neighbours' own
   contexts with omega written in (:func:`~lm_eval_c3po.score.choice_loss`),
4. and optionally logs a diagnostics record per context.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lm_eval_c3po.remix.config import C3POConfig
from lm_eval_c3po.remix.core_experts import core_expert_mask
from lm_eval_c3po.remix.icl import demonstration_prefixes, with_prefixes
from lm_eval_c3po.remix.memory import budget_bytes, parse_bytes, split_by_bytes
from lm_eval_c3po.remix.methods import METHODS, Problem, Solution
from lm_eval_c3po.remix.oracle import oracle_pathways
from lm_eval_c3po.retrieve import Embedder, Neighbours, Retriever, as_kernel_spec
from lm_eval_c3po.routing import (
    RoutingController,
    input_device,
    own_pathways,
    token_slots,
)
from lm_eval_c3po.score import (
    ChoiceLoss,
    Example,
    PrefixCache,
    TrieScorer,
    choice_loss,
    fast_path_applies,
)
from lm_eval_c3po.score.cost import CostMeter
from lm_eval_c3po.score.footprint import Footprint, LossShape
from lm_eval_c3po.store import ReferenceStore, lm_signature, resolve_store

logger = logging.getLogger(__name__)


class StepPredictions:
    """NGD's observer: the test contexts' predicted choice under each step's omega (``record_steps``).

    Scored on the contexts' own prepared tries (their answer tokens only); not counted as re-mixing work.
    """

    def __init__(self, scorer: TrieScorer, choices: Sequence[int], cost: CostMeter):
        self.scorer, self.choices, self.cost = scorer, list(choices), cost
        self.predictions: list[list[int]] = [[] for _ in choices]

    def __call__(self, step: int, omega: torch.Tensor) -> None:
        with self.cost.phase(None), torch.no_grad():
            ll, _ = self.scorer.row_scores(omega)
        for b, part in enumerate(ll.split(self.choices)):
            self.predictions[b].append(int(part.argmax()))

    def part(self, contexts: Sequence[int]) -> StepPredictions:
        """The observer of a part of the batch (:meth:`Remixer._parts`): its contexts' tries come from this
        scorer's cache, their predictions land in this observer's lists."""
        scorer = self.scorer
        sub = StepPredictions(TrieScorer(scorer.model, scorer.routing, scorer.layer_ids, scorer.tokens,
                                         [scorer.examples[b] for b in contexts], scorer.max_length,
                                         scorer.budget_rows, scorer.cache, scorer.softmax_dtype),
                              [self.choices[b] for b in contexts], self.cost)
        sub.predictions = [self.predictions[b] for b in contexts]
        return sub


@dataclasses.dataclass
class BallCounts:
    """Epsilon-ball sizes over a run: how many contexts, how many neighbours, how many fell back to the nearest."""

    contexts: int = 0
    neighbours: int = 0
    fallbacks: int = 0

    def add(self, neighbours: Neighbours) -> None:
        self.contexts += len(neighbours.valid)
        self.neighbours += int(neighbours.valid.sum())
        self.fallbacks += int(neighbours.fallback.sum())

    def summary(self, eps: float, candidates: int) -> str:
        mean = self.neighbours / max(self.contexts, 1)
        return (f"c3po: epsilon-ball eps={eps} over the {candidates} nearest references: {self.contexts} contexts, "
                f"{mean:.2f} neighbours on average, {self.fallbacks} empty balls fell back to the single nearest")


@dataclasses.dataclass
class SplitCounts:
    """What ``remix_memory`` did over a run: remix batches, the parts they were optimised in, and the largest
    part's estimated bytes (benchmarks set it beside the measured peak)."""

    batches: int = 0
    parts: int = 0
    largest_part_bytes: int = 0

    def add(self, part_bytes: list[int]) -> None:
        self.batches += 1
        self.parts += len(part_bytes)
        self.largest_part_bytes = max([self.largest_part_bytes, *part_bytes])


class Remixer:
    """Computes omega* for test contexts from a reference store (see the module docstring)."""

    def __init__(self, model, tokenizer, routing: RoutingController, store: ReferenceStore, embedder,
                 config: C3POConfig, max_length: int, softmax_dtype: torch.dtype | None = None):
        self.model, self.tokenizer, self.routing = model, tokenizer, routing
        self.store, self.config, self.max_length = store, config, max_length
        self.softmax_dtype = softmax_dtype  # HFLM's: scores follow its precision
        self.method = METHODS[config.method]
        self.simplex = routing.routing_kind == "softmax"
        self.layer_ids = list(config.layer_ids)
        self.slots = token_slots(config.tokens)  # omega rows are (slot, critical layer) pairs, slot-major
        store.pathways(np.zeros(0, dtype=np.int64), self.slots, self.layer_ids)  # refuse missing slots up front
        self.device = input_device(model)
        kernel = dataclasses.replace(as_kernel_spec(config.kernel), degree=config.degree, coef0=config.coef0)
        self.retriever = Retriever(store, embedder, k=config.k, eps=config.eps, eps_candidates=config.eps_candidates,
                                   dedup=config.dedup, kernel=kernel, bandwidth=config.bandwidth)
        self.ball = BallCounts()
        model.requires_grad_(False)  # only omega is optimised
        self.loss_cache = PrefixCache()  # prepared neighbours, shared by every neighbourhood loss
        self._diagnostics = Path(config.diagnostics) if config.diagnostics else None
        self._references: torch.Tensor | None = None
        self.cost = CostMeter(model)  # token-layer evaluations per phase (diagnostics "cost")
        self.memory_setting = parse_bytes(config.remix_memory)  # None: a share of the device's free memory
        self.loss_calls = self.method.loss_calls(config)  # None: the method never calls the loss, nothing to split
        self.loss_shape = (LossShape.of(model, routing, self.layer_ids, max_length, softmax_dtype)
                           if self.loss_calls is not None else None)
        self.split = SplitCounts()
        self._reported_split = self._warned_over_budget = False

    @classmethod
    def from_lm(cls, lm, config: C3POConfig, embedder: Embedder | None = None) -> Remixer:
        """A Remixer over the stores ``config.reference`` (merged), checked against ``lm`` and the embedder."""
        embedder = embedder if embedder is not None else Embedder(config.embedder, device=str(lm.device))
        expect = lm_signature(lm)
        stores = [ReferenceStore.load(resolve_store(spec), expect=expect, embedder=embedder.signature)
                  for spec in config.reference]
        store = (stores[0] if len(stores) == 1 else ReferenceStore.merge(stores)).answered_correctly()
        return cls(lm.model, lm.tokenizer, lm.routing, store, embedder, config, lm.max_length,
                   getattr(lm, "softmax_dtype", None))

    # -- the pathway of every context -----------------------------------------

    def pathways(self, texts: Sequence[str], contexts: Sequence[Sequence[int]], progress: bool = True
                 ) -> list[torch.Tensor]:
        """omega* ``[1, P * L_crit, E]`` (slot-major rows) of each context, given as the tokens the model sees
        (already truncated)."""
        out: list[torch.Tensor] = []
        for part in self._batches(len(contexts), "re-mixing", progress):
            batch = [list(c) for c in contexts[part]]
            with self.cost.phase("own"):  # the own scoring then runs in lm-eval's batches, not counted here
                omega0 = self.own_pathways(batch)
            omega, diagnostics = self._remix(list(texts[part]), omega0)
            self._write_diagnostics(diagnostics, self.cost.take())
            out.extend(row.unsqueeze(0) for row in omega)
        return out

    def score(self, texts: Sequence[str], contexts: Sequence[Sequence[int]],
              continuations: Sequence[Sequence[Sequence[int]]], progress: bool = True
              ) -> list[list[tuple[float, bool]]]:
        """lm-eval's ``(log-likelihood, is_greedy)`` of each context's continuations under its omega*.

        One prepared pass per context serves both its own pathway (the routing
        at its last token) and the scoring of all its continuations, which then
        costs only the last context token and the answer tokens
        (:class:`~lm_eval_c3po.score.TrieScorer`). Needs :meth:`scores_from_capture`.
        """
        out: list[list[tuple[float, bool]]] = []
        for part in self._batches(len(contexts), "re-mixing and scoring", progress):
            examples = [[Example(list(ctx), [list(c) for c in conts], 0)]
                        for ctx, conts in zip(contexts[part], continuations[part])]
            scorer = TrieScorer(self.model, self.routing, self.layer_ids, self.config.tokens, examples,
                                self.max_length, cache=PrefixCache(), softmax_dtype=self.softmax_dtype)
            with self.cost.phase("own"):
                omega0 = scorer.own_routing()
            observe = self._step_recorder(scorer) if self.config.record_steps else None
            omega, diagnostics = self._remix(list(texts[part]), omega0, observe)
            with self.cost.phase("own"):
                ll, greedy = scorer.row_scores(omega)
            if observe is not None:
                for record, predictions in zip(diagnostics, observe.predictions):
                    record["step_predictions"] = predictions
            self._write_diagnostics(diagnostics, self.cost.take())
            cursor = 0
            for conts in continuations[part]:
                out.append([(float(ll[cursor + c]), bool(greedy[cursor + c])) for c in range(len(conts))])
                cursor += len(conts)
        return out

    def scores_from_capture(self, max_continuation: int) -> bool:
        """Whether :meth:`score` applies: a re-mixing method, a model on the prefix-cached path, and
        continuations short enough that lm-eval's truncation leaves a context token."""
        return (self.method.pathway is not None and max_continuation < self.max_length
                and fast_path_applies(self.model, self.routing, self.layer_ids, self.max_length))

    def _batches(self, total: int, what: str, progress: bool) -> Iterator[slice]:
        """``remix_batch_size`` contexts at a time under a progress bar."""
        size = self.config.remix_batch_size
        with tqdm(total=total, desc=f"C3PO {what} ({self.config.method})", unit="ctx", disable=not progress) as bar:
            for start in range(0, total, size):
                yield slice(start, start + size)
                bar.update(min(size, total - start))

    def _step_recorder(self, scorer: TrieScorer) -> StepPredictions:
        return StepPredictions(scorer, [len(items[0].choices) for items in scorer.examples], self.cost)

    def _remix(self, texts: list[str], omega0: torch.Tensor, observe: StepPredictions | None = None
               ) -> tuple[torch.Tensor, list[dict]]:
        """omega* of a batch and its diagnostics records (empty without ``diagnostics``).

        The batch is optimised in parts that fit ``remix_memory`` (:mod:`.memory`); the parts give the numbers
        of the whole, since no context's optimisation reads another's.
        """
        if self.method.pathway is None:
            raise ValueError(f"method {self.config.method!r} does not re-mix pathways")
        neighbours, weights = self.retriever(texts)
        if self.config.eps is not None:
            self.ball.add(neighbours)
        parts = self._parts(neighbours)
        solutions = []
        for part in parts:
            rows = torch.tensor(part)
            part_observe = observe if observe is None or len(parts) == 1 else observe.part(part)
            problem = self._problem(omega0[rows], neighbours.take(rows), weights[rows], part_observe)
            with self.cost.phase("optimisation"):
                solutions.append(self.method.pathway(problem))
        solution = Solution.joined(solutions)
        omega = solution.omega.detach()
        return omega, self._diagnostic_records(texts, omega0, omega, neighbours, weights, solution)

    def _problem(self, omega0: torch.Tensor, neighbours: Neighbours, weights: torch.Tensor,
                 observe: StepPredictions | None) -> Problem:
        return Problem(
            omega0=omega0,
            free=core_expert_mask(omega0, self.config.core_experts, self.routing.top_k),
            neighbours=neighbours,
            weights=weights,
            neighbour_pathways=lambda: torch.from_numpy(
                self.store.pathways(neighbours.indices.clamp_min(0).numpy(), self.slots, self.layer_ids)),
            reference_pathways=self._reference_pathways,
            loss=lambda: self._prepared(self.neighbourhood_loss(neighbours, weights)),
            options=self.config,
            kernel=self.retriever.kernel,
            pathway_bandwidth=None if isinstance(self.config.bandwidth, str) else float(self.config.bandwidth),
            simplex=self.simplex,
            observe=observe,
        )

    def _parts(self, neighbours: Neighbours) -> list[list[int]]:
        """The batch's contexts in consecutive parts whose estimated optimisation bytes fit the budget."""
        contexts = len(neighbours.valid)
        calls = self.loss_calls
        if calls is None:
            return [list(range(contexts))]
        footprints = [self.loss_shape.call(examples, self.max_length, self.config.tokens, self.config.loss,
                                           calls.candidates, calls.grad)
                      for examples in self.neighbour_examples(neighbours)]
        budget = budget_bytes(self.memory_setting, self.device)
        parts = split_by_bytes(footprints, budget)
        part_bytes = [sum((footprints[i] for i in part), Footprint()).bytes for part in parts]
        self.split.add(part_bytes)
        if len(parts) > 1 or (budget is not None and max(part_bytes, default=0) > budget):
            self._report_split(part_bytes, contexts, budget)
        return parts

    def _report_split(self, part_bytes: list[int], contexts: int, budget: int) -> None:
        """Say once per run that batches are split, and warn once about a context over the budget on its own."""
        gib = 2**30
        if max(part_bytes) > budget and not self._warned_over_budget:
            self._warned_over_budget = True
            logger.warning(
                "c3po: one context's %s optimisation is estimated at %.2f GiB, over remix_memory=%s (%.2f GiB); "
                "it runs alone and may still run out of memory: lower k or max_length, raise remix_memory, or "
                "free device memory", self.config.method, max(part_bytes) / gib, self.config.remix_memory,
                budget / gib)
        if len(part_bytes) > 1 and not self._reported_split:
            self._reported_split = True
            logger.info("c3po: remix batches are optimised in parts to fit remix_memory=%s (%.2f GiB now): "
                        "%d contexts in %d parts, the largest estimated at %.3f GiB", self.config.remix_memory,
                        budget / gib, contexts, len(part_bytes), max(part_bytes) / gib)

    def _prepared(self, loss: ChoiceLoss) -> ChoiceLoss:
        """Prepare the neighbours of a prefix-cached loss now, so their passes count as neighbour work."""
        if isinstance(loss.scorer, TrieScorer):
            with self.cost.phase("neighbours"), torch.no_grad():
                loss.scorer.trie_batch()
        return loss

    def _reference_pathways(self) -> torch.Tensor:
        """Every reference's pathway ``[N, P * L_crit, E]`` (mode finding searches them all), read once."""
        if self._references is None:
            self._references = torch.from_numpy(self.store.pathways(np.arange(len(self.store)), self.slots,
                                                                    self.layer_ids))
        return self._references

    def neighbourhood_loss(self, neighbours: Neighbours, weights: torch.Tensor) -> ChoiceLoss:
        """The NGD / alpha-search objective over each context's valid neighbours."""
        examples = self.neighbour_examples(neighbours)
        compact = torch.zeros_like(weights)
        for b, valid in enumerate(neighbours.valid):
            kept = weights[b][valid]
            compact[b, : len(kept)] = kept
        return choice_loss(self.model, self.routing, self.layer_ids, self.config.tokens, examples, compact,
                           self.max_length, cache=self.loss_cache, objective=self.config.loss,
                           softmax_dtype=self.softmax_dtype)

    def neighbour_examples(self, neighbours: Neighbours) -> list[list[Example]]:
        """Each context's valid neighbours as examples, in retrieval order."""
        return [[self.reference_example(int(r)) for r, ok in zip(row, valid) if ok]
                for row, valid in zip(neighbours.indices.tolist(), neighbours.valid.tolist())]

    def reference_example(self, row: int) -> Example:
        return Example(
            [int(t) for t in self.store.context_ids(row)],
            [[int(t) for t in c] for c in self.store.choice_ids(row)],
            int(self.store.gold[row]),
        )

    # -- analysis and the ICL baseline -----------------------------------------

    def own_pathways(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        """The contexts' own routing ``[B, P * L_crit, E]`` at the run's token slots."""
        return own_pathways(self.model, self.routing, self.layer_ids, contexts, self.max_length, self.config.tokens)

    def oracle(self, examples: Sequence[Example]) -> torch.Tensor:
        """NGD on each test example's *own* gold loss: an upper bound for analysis, never a C3PO score."""
        return oracle_pathways(self.model, self.routing, self.config, examples, self.max_length, self.softmax_dtype)

    def with_demonstrations(self, requests):
        """The ICL baseline: the same retrieved neighbours prepended as solved demonstrations."""
        contexts = list(dict.fromkeys(req.args[0] for req in requests))
        neighbours, _ = self.retriever(contexts)
        return with_prefixes(requests, dict(zip(contexts, demonstration_prefixes(neighbours, self.store))))

    # -- diagnostics ----------------------------------------------------------

    def _diagnostic_records(self, texts, omega0, omega, neighbours, weights, solution: Solution) -> list[dict]:
        if self._diagnostics is None:
            return []
        alpha = solution.alpha or [None] * len(texts)
        losses = solution.losses or [[] for _ in texts]
        records = []
        for b, text in enumerate(texts):
            nbrs = [
                {"row": int(r), "source": self.store.texts[int(r)]["id"], "similarity": float(s),
                 "weight": float(w)}
                for r, s, w, ok in zip(neighbours.indices[b], neighbours.similarities[b], weights[b],
                                       neighbours.valid[b]) if ok
            ]
            records.append({
                "context_hash": hashlib.sha1(text.encode()).hexdigest(),
                "context": text[:200],
                "method": self.config.method,
                "critical_layers": self.layer_ids,
                "token_slots": self.slots,
                "num_experts": self.routing.num_experts,
                "top_k": self.routing.top_k,
                "neighbours": nbrs,
                "before": self._weights_and_topk(omega0[b]),
                "after": self._weights_and_topk(omega[b]),
                "loss": losses[b],
                "alpha": alpha[b],
                "steps": self.config.steps,
                "ball": {"size": len(nbrs), "fallback": bool(neighbours.fallback[b])}
                if self.config.eps is not None else None,
            })
        return records

    def _write_diagnostics(self, records: list[dict], cost: dict[str, int]) -> None:
        """Append a batch's records, each with the batch's counted work split evenly over its questions."""
        if not records:
            return
        per_question = {phase: count / len(records) for phase, count in cost.items()}
        self._diagnostics.parent.mkdir(parents=True, exist_ok=True)
        with open(self._diagnostics, "a") as f:
            for record in records:
                f.write(json.dumps({**record, "cost": per_question}) + "\n")

    def _weights_and_topk(self, omega: torch.Tensor) -> dict:
        """Rows (and their top-k) per (token slot, critical layer), slot-major as omega holds them."""
        topk = []
        for n, row in enumerate(omega):
            layer = self.routing.layers[self.layer_ids[n % len(self.layer_ids)]]
            row = row.unsqueeze(0).to(self.device)
            topk.append(sorted(layer.adapter.route(layer.router, row, row.clamp_min(1e-30).log())[1][0].tolist()))
        return {"weights": omega.tolist(), "topk": topk}
