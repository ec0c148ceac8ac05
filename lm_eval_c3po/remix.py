"""Test-time re-mixing: from test contexts to their pathways omega*.

For a batch of test contexts the :class:`Remixer`
1. reads each context's own pathway (the routing of its last context token
   in the critical layers) with one capture pass,
2. retrieves similar reference questions the model answered correctly
   (sentence embedding, FAISS cosine k-NN or epsilon-ball, near-duplicates dropped),
3. applies the chosen method from :mod:`lm_eval_c3po.methods`,
4. and optionally logs a diagnostics record per context.

The neighbourhood loss of kernel regression and NGD runs the model on the
neighbours' own contexts with omega written at their last context token and
scores their gold answer (:class:`ChoiceLoss`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lm_eval_c3po import methods
from lm_eval_c3po.config import C3POConfig
from lm_eval_c3po.routing import RoutingController, input_device, token_positions

logger = logging.getLogger(__name__)

MODE_FINDING_ALPHA = 0.5  # mode finding's step when alpha is not given
EPS_BALL_CANDIDATES = 64  # an epsilon-ball is searched among this many nearest references


@dataclass(frozen=True)
class Example:
    """A multiple-choice item as token ids: context, one continuation per choice, gold index."""

    context: Sequence[int]
    choices: Sequence[Sequence[int]]
    gold: int


class ChoiceLoss:
    """``L(omega) = sum_i w_i * CE_i(omega) / sum_i w_i`` for every test context.

    ``CE_i`` is the cross-entropy of example i's gold choice under a softmax
    over its choices' summed log-likelihoods (the quantity lm-eval's ``acc``
    takes the argmax of), with omega written at example i's context token
    positions in the critical layers. Called with ``omega [B, *G, L, E]``
    (``G`` candidate pathways per context, e.g. kernel regression's alpha
    grid) it returns ``[B, *G]``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        routing: RoutingController,
        layer_ids: Sequence[int],
        tokens: str,
        examples: Sequence[Sequence[Example]],
        weights: torch.Tensor,
        max_length: int,
        max_rows: int = 64,
    ):
        self.model, self.routing, self.layer_ids, self.tokens = model, routing, list(layer_ids), tokens
        self.examples, self.max_rows = examples, max_rows
        self.weights = weights.float()
        self.device = input_device(model)
        # One row per (context b, example i, choice c): lm-eval's causal input layout.
        self._rows: list[tuple[int, int, int, list[int], int, int]] = []
        for b, items in enumerate(examples):
            for i, ex in enumerate(items):
                for c, cont in enumerate(ex.choices):
                    whole = (list(ex.context) + list(cont))[-(max_length + 1):][:-1]
                    ctx_len = len(whole) - len(cont) + 1
                    self._rows.append((b, i, c, whole, ctx_len, len(cont)))

    def __call__(self, omega: torch.Tensor) -> torch.Tensor:
        batch, lead = omega.shape[0], omega.shape[1:-2]
        per = int(np.prod(lead)) if lead else 1
        flat = omega.reshape(batch * per, *omega.shape[-2:])
        jobs = [(g, row) for g in range(per) for row in self._rows]
        lls = []
        for start in range(0, len(jobs), self.max_rows):
            lls.append(self._log_likelihoods(flat, jobs[start:start + self.max_rows], per))
        ll = torch.cat(lls) if lls else flat.new_zeros(0)
        losses = []
        by_slot: dict[tuple[int, int], list[torch.Tensor]] = {}
        for value, (g, (b, i, *_)) in zip(ll, jobs):
            by_slot.setdefault((b * per + g, i), []).append(value)
        for b in range(batch):
            for g in range(per):
                items = self.examples[b]
                ces = [
                    -torch.log_softmax(torch.stack(by_slot[(b * per + g, i)]), 0)[ex.gold]
                    for i, ex in enumerate(items)
                ]
                if not ces:
                    losses.append(flat.new_zeros(()) * flat[b * per + g].sum())
                    continue
                losses.append(methods.neighbourhood_loss(torch.stack(ces), self.weights[b, : len(ces)]))
        return torch.stack(losses).reshape(batch, *lead)

    def _log_likelihoods(self, flat: torch.Tensor, jobs, per: int) -> torch.Tensor:
        width = max(len(row[3]) for _, row in jobs)
        ids = torch.zeros(len(jobs), width, dtype=torch.long)
        for n, (_, row) in enumerate(jobs):
            ids[n, : len(row[3])] = torch.tensor(row[3])
        positions = token_positions(self.tokens, [row[4] for _, row in jobs])
        owner = torch.tensor([row[0] * per + g for g, row in jobs])
        omega = flat[owner].unsqueeze(1).expand(-1, positions.shape[1], -1, -1)
        with self.routing.override(positions, omega, layers=self.layer_ids):
            logits = self.model(ids.to(self.device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        out = []
        for n, (_, row) in enumerate(jobs):
            whole, cont_len = row[3], row[5]
            end = len(whole)
            targets = torch.tensor(list(self._continuation(row)), device=logprobs.device)
            out.append(logprobs[n, end - cont_len:end].gather(-1, targets.unsqueeze(-1)).sum())
        return torch.stack(out)

    def _continuation(self, row) -> Sequence[int]:
        b, i, c = row[0], row[1], row[2]
        return self.examples[b][i].choices[c]


def own_pathways(model, routing: RoutingController, layer_ids: Sequence[int], contexts: Sequence[Sequence[int]],
                 max_length: int) -> torch.Tensor:
    """The model's own routing ``[B, L_crit, E]`` at each context's last token (one capture pass)."""
    contexts = [list(c)[-max_length:] for c in contexts]
    ids = torch.zeros(len(contexts), max(map(len, contexts)), dtype=torch.long)
    for b, c in enumerate(contexts):
        ids[b, : len(c)] = torch.tensor(c)
    positions = token_positions("last", [len(c) for c in contexts])
    with torch.no_grad(), routing.capture(positions, layers=layer_ids) as cap:
        model(ids.to(input_device(model)))
    return cap.routing[:, 0].float()


def descend(omega0: torch.Tensor, free: torch.Tensor, loss, config: C3POConfig, simplex: bool) -> methods.NGDResult:
    """NGD on ``loss``; gradients are switched on whatever the caller's mode (lm-eval scores under no_grad)."""
    with torch.enable_grad():
        return methods.optimise_pathway(
            omega0, loss, free, steps=config.steps, lr=config.lr, lr_min=config.lr_min, schedule=config.schedule,
            simplex=simplex,
        )


def oracle_pathways(model, routing: RoutingController, config: C3POConfig, examples: Sequence[Example],
                    max_length: int) -> torch.Tensor:
    """The oracle: NGD on each example's *own* gold loss, ``[B, L_crit, E]``.

    An upper bound for analysis where the gold answer is known; never a C3PO
    score. Needs no reference store. ``config`` must be resolved for the model.
    """
    omega0 = own_pathways(model, routing, config.layer_ids, [ex.context for ex in examples], max_length)
    free = methods.core_expert_mask(omega0, config.core_experts, routing.top_k)
    from lm_eval_c3po.cached_loss import CachedChoiceLoss  # imports this module

    loss = CachedChoiceLoss(model, routing, config.layer_ids, config.tokens, [[ex] for ex in examples],
                            torch.ones(len(examples), 1), max_length)
    return descend(omega0, free, loss, config, routing.routing_kind == "softmax").omega


class Remixer:
    """Computes omega* for test contexts from a reference store (see the module docstring)."""

    def __init__(self, model, tokenizer, routing: RoutingController, store, embedder, config: C3POConfig,
                 max_length: int):
        self.model, self.tokenizer, self.routing = model, tokenizer, routing
        self.store, self.embedder, self.config = store, embedder, config
        self.max_length = max_length
        self.simplex = routing.routing_kind == "softmax"
        self.layer_ids = list(config.layer_ids)
        self.kernel = "matern1.5" if config.kernel == "matern" else config.kernel
        self.device = input_device(model)
        if config.k > len(store):
            raise ValueError(
                f"k={config.k} neighbours asked for, but the reference store holds only {len(store)} "
                "references: lower k or build a larger store"
            )
        model.requires_grad_(False)  # only omega is optimised
        from lm_eval_c3po.cached_loss import PrefixCache  # imports this module

        self.loss_cache = PrefixCache()  # prepared neighbours, shared by every neighbourhood loss
        self._diagnostics = Path(config.diagnostics) if config.diagnostics else None

    @classmethod
    def from_lm(cls, lm, config: C3POConfig) -> Remixer:
        from lm_eval_c3po.embedding import Embedder
        from lm_eval_c3po.identity import lm_signature
        from lm_eval_c3po.store import ReferenceStore

        embedder = Embedder(config.embedder, device=str(lm.device))
        expect = lm_signature(lm)
        stores = [ReferenceStore.load(path, expect=expect, embedder=embedder.signature) for path in config.reference]
        store = stores[0] if len(stores) == 1 else ReferenceStore.merge(stores)
        return cls(lm.model, lm.tokenizer, lm.routing, store, embedder, config, lm.max_length)

    # -- the pathway of every context -----------------------------------------

    def pathways(self, texts: Sequence[str], contexts: Sequence[Sequence[int]], progress: bool = True
                 ) -> dict[tuple[int, ...], torch.Tensor]:
        """omega* ``[1, L_crit, E]`` per distinct context (keyed by its token ids)."""
        out: dict[tuple[int, ...], torch.Tensor] = {}
        for part in self._chunks(len(contexts), "re-mixing", progress):
            chunk_ctx = [list(c) for c in contexts[part]]
            omega, diagnostics = self._remix(list(texts[part]), chunk_ctx)
            for b, context in enumerate(chunk_ctx):
                out[tuple(context)] = omega[b].unsqueeze(0)
            self._write_diagnostics(diagnostics)
        return out

    def score(self, texts: Sequence[str], contexts: Sequence[Sequence[int]],
              continuations: Sequence[Sequence[Sequence[int]]], progress: bool = True
              ) -> list[list[tuple[float, bool]]]:
        """lm-eval's ``(log-likelihood, is_greedy)`` of each context's continuations under its omega*.

        One prefix pass per context serves both its own pathway (the routing at
        its last token) and the scoring of all its continuations, which then
        costs only the last context token and the answer tokens (see
        :mod:`lm_eval_c3po.cached_loss`). Needs :meth:`scores_from_capture`.
        """
        from lm_eval_c3po.cached_loss import CachedChoiceLoss, PrefixCache

        out: list[list[tuple[float, bool]]] = []
        for part in self._chunks(len(contexts), "re-mixing and scoring", progress):
            chunk_ctx = [list(c) for c in contexts[part]]
            examples = [[Example(ctx, [list(c) for c in conts], 0)]
                        for ctx, conts in zip(chunk_ctx, continuations[part])]
            scorer = CachedChoiceLoss(self.model, self.routing, self.layer_ids, self.config.tokens, examples,
                                      torch.ones(len(examples), 1), self.max_length, cache=PrefixCache())
            omega, diagnostics = self._remix(list(texts[part]), chunk_ctx, scorer.own_routing())
            ll, greedy = scorer.row_scores(omega)
            cursor = 0
            for conts in continuations[part]:
                out.append([(float(ll[cursor + c]), bool(greedy[cursor + c])) for c in range(len(conts))])
                cursor += len(conts)
            self._write_diagnostics(diagnostics)
        return out

    def _chunks(self, total: int, what: str, progress: bool) -> Iterator[slice]:
        """``remix_batch_size`` contexts at a time under a progress bar, from the configured seed."""
        torch.manual_seed(self.config.seed)
        size = self.config.remix_batch_size
        with tqdm(total=total, desc=f"C3PO {what} ({self.config.method})", unit="ctx", disable=not progress) as bar:
            for start in range(0, total, size):
                yield slice(start, start + size)
                bar.update(min(size, total - start))

    def scores_from_capture(self, max_continuation: int) -> bool:
        """Whether :meth:`score` applies: a re-mixing method, a model on the prefix-cached path, and
        continuations short enough that lm-eval's truncation leaves a context token."""
        from lm_eval_c3po.cached_loss import fast_path_applies

        return (self.config.method in ("mode_finding", "kernel_regression", "ngd")
                and max_continuation < self.max_length
                and fast_path_applies(self.model, self.routing, self.layer_ids, self.max_length))

    def own_pathways(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        return own_pathways(self.model, self.routing, self.layer_ids, contexts, self.max_length)

    def _remix(self, texts: list[str], contexts: list[list[int]], omega0: torch.Tensor | None = None):
        cfg = self.config
        if omega0 is None:
            omega0 = self.own_pathways(contexts)
        free = methods.core_expert_mask(omega0, cfg.core_experts, self.routing.top_k)
        neighbours, weights = self._neighbours(texts)
        info: dict = {"alpha": [None] * len(contexts), "loss": [[] for _ in contexts]}
        if cfg.method == "mode_finding":
            refs = torch.from_numpy(np.asarray(self.store.routing[:, self.layer_ids]))
            omega = methods.mean_shift(
                omega0, refs, k=cfg.k, alpha=MODE_FINDING_ALPHA if cfg.alpha is None else cfg.alpha,
                iters=cfg.mode_iters, kernel=self.kernel, bandwidth=cfg.bandwidth, free_mask=free,
                simplex=self.simplex,
            ).omega
        elif cfg.method == "kernel_regression":
            omega, info = self._kernel_regression(omega0, free, contexts, neighbours, weights, info)
        elif cfg.method == "ngd":
            result = self._descend(omega0, free, self.neighbourhood_loss(neighbours, weights))
            omega = result.omega
            info["loss"] = [[float(x) for x in row if np.isfinite(float(x))] for row in result.losses]
        else:
            raise ValueError(f"method {cfg.method!r} does not re-mix pathways")
        return omega.detach(), self._diagnostic_records(texts, omega0, omega, neighbours, weights, info)

    def _kernel_regression(self, omega0, free, contexts, neighbours, weights, info):
        has = neighbours.valid.any(-1)
        refs = self._reference_pathways(neighbours)
        safe_w = torch.where(has.unsqueeze(-1), weights, torch.ones_like(weights))
        omega_hat = torch.where(has[:, None, None], methods.weighted_average(safe_w, refs), omega0)
        if self.config.alpha is not None:
            alpha = torch.full((len(contexts),), float(self.config.alpha))
            omega = methods.blend(omega0, omega_hat, alpha[:, None, None], free, self.simplex)
            info["alpha"] = alpha.tolist()
            return omega, info
        choice = methods.choose_alpha(omega0, omega_hat, self.neighbourhood_loss(neighbours, weights),
                                      free_mask=free, simplex=self.simplex)
        info["alpha"] = choice.alpha.tolist()
        info["loss"] = choice.losses.tolist()
        return choice.omega, info

    # -- retrieval ------------------------------------------------------------

    def _neighbours(self, texts: list[str]) -> tuple[methods.Neighbours, torch.Tensor]:
        cfg = self.config
        queries = self.embedder.encode(texts)
        if cfg.eps is None:
            sims, idx = self.store.knn(queries, cfg.k, dedup=cfg.dedup)
            found = methods.k_nearest(torch.from_numpy(sims), torch.from_numpy(idx), k=cfg.k)
        else:
            sims, idx = self.store.knn(queries, min(EPS_BALL_CANDIDATES, len(self.store)), dedup=cfg.dedup)
            found = methods.epsilon_ball(torch.from_numpy(sims), torch.from_numpy(idx), cfg.eps)
        weights = methods.kernel_weights_from_cosine(
            found.similarities.float(), self.kernel, cfg.bandwidth, valid=found.valid
        )
        weights = torch.where(found.valid, weights, torch.zeros_like(weights))
        return found, weights

    def _reference_pathways(self, neighbours: methods.Neighbours) -> torch.Tensor:
        rows = neighbours.indices.clamp_min(0).numpy()
        return torch.from_numpy(np.asarray(self.store.routing[rows][..., self.layer_ids, :]))

    def neighbourhood_loss(self, neighbours: methods.Neighbours, weights: torch.Tensor) -> ChoiceLoss:
        """The NGD / alpha-search objective over each context's valid neighbours."""
        examples = [
            [self.reference_example(int(r)) for r, ok in zip(row, valid) if ok]
            for row, valid in zip(neighbours.indices.tolist(), neighbours.valid.tolist())
        ]
        compact = torch.zeros_like(weights)
        for b, valid in enumerate(neighbours.valid):
            kept = weights[b][valid]
            compact[b, : len(kept)] = kept
        from lm_eval_c3po.cached_loss import CachedChoiceLoss

        return CachedChoiceLoss(self.model, self.routing, self.layer_ids, self.config.tokens, examples, compact,
                                self.max_length, cache=self.loss_cache)

    def reference_example(self, row: int) -> Example:
        return Example(
            [int(t) for t in self.store.context_ids(row)],
            [[int(t) for t in c] for c in self.store.choice_ids(row)],
            int(self.store.gold[row]),
        )

    # -- analysis -------------------------------------------------------------

    def oracle(self, examples: Sequence[Example]) -> torch.Tensor:
        """NGD on each test example's *own* gold loss: an upper bound for analysis, never a C3PO score."""
        return oracle_pathways(self.model, self.routing, self.config, examples, self.max_length)

    def _descend(self, omega0: torch.Tensor, free: torch.Tensor, loss: ChoiceLoss) -> methods.NGDResult:
        return descend(omega0, free, loss, self.config, self.simplex)

    def with_demonstrations(self, requests):
        """The ICL baseline: the same retrieved neighbours prepended as solved demonstrations."""
        contexts = list(dict.fromkeys(req.args[0] for req in requests))
        neighbours, _ = self._neighbours(contexts)
        prefix = {}
        for context, row, valid in zip(contexts, neighbours.indices.tolist(), neighbours.valid.tolist()):
            demos = []
            for r, ok in zip(row, valid):
                if ok:
                    text = self.store.texts[r]
                    demos.append(f"{text['question']} {text['choices'][int(self.store.gold[r])]}")
            prefix[context] = "".join(d + "\n\n" for d in reversed(demos))  # the nearest sits next to the question
        return [dataclasses.replace(req, arguments=(prefix[req.args[0]] + req.args[0], *req.args[1:]))
                for req in requests]

    # -- diagnostics ----------------------------------------------------------

    def _diagnostic_records(self, texts, omega0, omega, neighbours, weights, info) -> list[dict]:
        if self._diagnostics is None:
            return []
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
                "num_experts": self.routing.num_experts,
                "top_k": self.routing.top_k,
                "neighbours": nbrs,
                "before": self._weights_and_topk(omega0[b]),
                "after": self._weights_and_topk(omega[b]),
                "loss": info["loss"][b],
                "alpha": info["alpha"][b],
                "steps": self.config.steps,
            })
        return records

    def _weights_and_topk(self, omega: torch.Tensor) -> dict:
        topk = []
        for slot, layer_id in enumerate(self.layer_ids):
            layer = self.routing.layers[layer_id]
            row = omega[slot].unsqueeze(0).to(self.device)
            topk.append(sorted(layer.adapter.route(layer.router, row, row.clamp_min(1e-30).log())[1][0].tolist()))
        return {"weights": omega.tolist(), "topk": topk}

    def _write_diagnostics(self, records: list[dict]) -> None:
        if not records or self._diagnostics is None:
            return
        self._diagnostics.parent.mkdir(parents=True, exist_ok=True)
        with open(self._diagnostics, "a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
