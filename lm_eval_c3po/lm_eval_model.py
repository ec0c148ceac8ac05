"""``lm_eval --model c3po``: an HFLM whose routers are re-mixed per test context.

The subclass keeps all of HFLM (loading, tokenisation, caching, data-parallel).
For the families on the prefix-cached path (:mod:`lm_eval_c3po.cached_loss`),
:meth:`C3POLM._loglikelihood_tokens` scores each context's choices from the
same pass that reads its own pathway (``Remixer.score``): the prefix is run
once, not once per choice. Other families hook ``_model_call`` (generation:
``_model_generate``): one pathway omega* is computed per distinct context
(:mod:`lm_eval_c3po.remix`) and, for every model input lm-eval will build,
where that context's tokens sit is recorded; when ``_model_call`` then sees a
padded batch, each row is matched back to its input and the routers are
overridden at that row's context positions.

``method=base`` installs no hook at all, so its numbers are ``--model hf``'s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from lm_eval.models.huggingface import HFLM

from lm_eval_c3po import distributed
from lm_eval_c3po.config import C3POConfig
from lm_eval_c3po.routing import RoutingController, token_positions

logger = logging.getLogger(__name__)

CACHE_SETTINGS_KEY = "lm_eval_c3po/settings"

Request = tuple[tuple[str, str], list[int], list[int]]


class CacheSettingsError(ValueError):
    """An lm-eval ``--use_cache`` database written under other settings."""


@dataclass(frozen=True)
class _Slot:
    """Where one context sits inside one model input."""

    context: tuple[int, ...]
    context_len: int  # context tokens left in the input after lm-eval's left truncation


class RowPlan:
    """Maps the rows of lm-eval's right-padded batches back to their requests.

    lm-eval builds each causal input as ``(context + continuation)[-(max_length + 1):][:-1]``
    and right-pads the batch with zeros; ``_model_call`` receives only the
    padded tensor, so rows are recognised by their exact unpadded tokens.
    """

    def __init__(self, requests: Sequence[Request], max_length: int):
        self._slots: dict[tuple[int, ...], _Slot] = {}
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(max_length + 1):][:-1]
            dropped = len(context) + len(continuation) - 1 - len(whole)
            self._slots[tuple(whole)] = _Slot(tuple(context), len(context) - dropped)
        self._lengths = sorted({len(k) for k in self._slots}, reverse=True)

    def match(self, row: list[int]) -> _Slot | None:
        """The slot whose input is ``row`` minus its right padding (longest match wins)."""
        last = len(row)
        while last > 0 and row[last - 1] == 0:
            last -= 1
        for length in self._lengths:
            if length < last:
                break
            if length <= len(row) and (slot := self._slots.get(tuple(row[:length]))) is not None:
                return slot
        return None


class C3POLM(HFLM):
    """HFLM with C3PO test-time expert re-mixing (see ``C3POConfig`` for the model_args)."""

    def __init__(self, pretrained, **kwargs) -> None:
        c3po_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in C3POConfig.field_names()}
        self.c3po = C3POConfig.from_model_args(c3po_kwargs)
        distributed.request_cpu_process_group()  # data-parallel on CPU processes; GPUs stay HFLM's
        super().__init__(pretrained=pretrained, **kwargs)
        distributed.join_cpu_processes(self)
        self.c3po = distributed.per_rank_diagnostics(self.c3po, self.rank, self.world_size)
        self.routing = RoutingController(self.model)
        self.c3po = self.c3po.resolved_for(self.routing)
        self._plan: RowPlan | None = None
        self._pathways: dict[tuple[int, ...], torch.Tensor] = {}
        self._captured: dict[tuple[int, ...], torch.Tensor] | None = None
        self._layers = self.c3po.layer_ids  # the MoE layers the pathways in flight belong to
        self._remixer = None
        self._suspended = False
        self._warned_rolling = False
        if self.c3po.method != "base":
            from lm_eval_c3po.remix import Remixer

            self._remixer = Remixer.from_lm(self, self.c3po)

    # -- lm-eval entry points -------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        if self.c3po.method == "icl":
            requests = self._remixer.with_demonstrations(requests)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        if self.c3po.method != "base" and not self._warned_rolling:
            logger.warning(
                "c3po: loglikelihood_rolling (perplexity tasks) has no question to retrieve references for; "
                "these requests run with the model's own routing (method=%s is not applied).",
                self.c3po.method,
            )
            self._warned_rolling = True
        with self._no_remix():
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        if self.c3po.method == "icl":
            requests = self._remixer.with_demonstrations(requests)
        if self._remixer is None or self.c3po.method == "icl":
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        contexts = [self.tok_encode(req.args[0]) for req in requests]
        self._pathways = self._remixer.pathways([req.args[0] for req in requests], contexts,
                                                progress=self._progress(disable_tqdm))
        try:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        finally:
            self._pathways = {}

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if self._remixer is None or self.c3po.method == "icl" or self._suspended:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        texts: dict[tuple[int, ...], str] = {}
        for (context, _), context_enc, _ in requests:
            texts.setdefault(tuple(context_enc), context)
        keys = list(texts)
        progress = self._progress(disable_tqdm)
        if self._remixer.scores_from_capture(max(len(cont) for _, _, cont in requests)):
            return self._score_from_capture(requests, texts, progress)
        self._pathways = self._remixer.pathways([texts[k] for k in keys], [list(k) for k in keys], progress)
        try:
            with self._planned(requests):
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._pathways = {}

    def _progress(self, disable_tqdm: bool) -> bool:
        return not disable_tqdm and self.rank == 0  # HFLM's rule for its own bars

    def _score_from_capture(self, requests, texts: dict[tuple[int, ...], str], progress: bool
                            ) -> list[tuple[float, bool]]:
        """Score each context's continuations from the pass that reads its own pathway (Remixer.score).

        The numbers are those of HFLM's padded batches with the hook (same
        rows, same truncation) up to float rounding; each result goes to
        lm-eval's ``--use_cache`` hook as HFLM does.
        """
        members: dict[tuple[int, ...], list[int]] = {key: [] for key in texts}
        for n, (_, context_enc, _) in enumerate(requests):
            members[tuple(context_enc)].append(n)
        keys = list(members)
        scores = self._remixer.score([texts[k] for k in keys], [list(k) for k in keys],
                                     [[requests[n][2] for n in members[k]] for k in keys], progress)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for key, per_context in zip(keys, scores):
            for n, answer in zip(members[key], per_context):
                results[n] = answer
                self.cache_hook.add_partial("loglikelihood", requests[n][0], answer)
        return results

    # -- routing-aware scoring for the reference builder ----------------------

    def loglikelihood_with_routing(
        self, requests: Sequence[Request], disable_tqdm: bool = True
    ) -> tuple[list[tuple[float, bool]], list[torch.Tensor]]:
        """Score requests exactly as ``--model hf`` does and capture, from the same forward
        passes, the routing ``[L, E]`` (every MoE layer) at each request's last context token."""
        self._captured = {}
        try:
            with self._planned(requests):
                results = HFLM._loglikelihood_tokens(self, list(requests), disable_tqdm=disable_tqdm)
            routing = [self._captured[tuple(ctx)] for _, ctx, _ in requests]
        finally:
            self._captured = None
        return results, routing

    def loglikelihood_with_pathways(
        self,
        requests: Sequence[Request],
        pathways: dict[tuple[int, ...], torch.Tensor],
        layers: Sequence[int] | None = None,
        disable_tqdm: bool = True,
    ) -> list[tuple[float, bool]]:
        """Score tokenized requests with given pathways ``{context ids: [1, len(layers), E]}``.

        For analysis (e.g. the oracle); ``layers`` default to this model's critical layers.
        """
        self._pathways, self._layers = pathways, tuple(layers) if layers is not None else self.c3po.layer_ids
        try:
            with self._planned(requests):
                return HFLM._loglikelihood_tokens(self, list(requests), disable_tqdm=disable_tqdm)
        finally:
            self._pathways, self._layers = {}, self.c3po.layer_ids

    # -- the hook -------------------------------------------------------------

    @contextmanager
    def _planned(self, requests: Sequence[Request]) -> Iterator[None]:
        self._plan = RowPlan(requests, self.max_length)
        try:
            yield
        finally:
            self._plan = None

    @contextmanager
    def _no_remix(self) -> Iterator[None]:
        """Score with the model's own routing (perplexity requests, the builder's capture pass)."""
        self._suspended = True
        try:
            yield
        finally:
            self._suspended = False

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        plan = self._plan
        if not plan or (not self._pathways and self._captured is None):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        slots = [plan.match(row) for row in inps.tolist()]
        lengths = [slot.context_len if slot else 1 for slot in slots]
        positions = token_positions(self.c3po.tokens if self._captured is None else "last", lengths)
        unmatched = torch.tensor([slot is None or slot.context_len < 1 for slot in slots])
        positions[unmatched] = -1
        if self._captured is not None:
            with self.routing.capture(positions) as cap:
                out = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            for slot, routing in zip(slots, cap.routing[:, 0]):
                if slot is not None:
                    self._captured.setdefault(slot.context, routing)
            return out
        omega = self._pathway_batch([s.context if s else None for s in slots], positions.shape[1])
        with self.routing.override(positions, omega, layers=self._layers):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _pathway_batch(self, keys: Sequence[tuple[int, ...] | None], num_positions: int) -> torch.Tensor:
        """omega ``[B, P, L_crit, E]`` for rows keyed by context ids.

        Rows without a pathway get any stored one as a placeholder: their
        positions are -1, so the override never applies it.
        """
        placeholder = next(iter(self._pathways.values()))
        omega = torch.stack([self._pathways.get(key, placeholder) for key in keys])
        return omega.expand(-1, num_positions, -1, -1) if omega.shape[1] == 1 else omega

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if not self._pathways:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        mask = generation_kwargs.get("attention_mask")
        rows = context.tolist() if mask is None else [
            [t for t, m in zip(row, mrow) if m] for row, mrow in zip(context.tolist(), mask.tolist())
        ]
        known = [tuple(r) in self._pathways for r in rows]
        # lm-eval left-pads prompts: a prompt of n tokens occupies the last n positions.
        lengths = torch.tensor([max(len(r), 1) for r in rows])
        positions = token_positions(self.c3po.tokens, lengths) + (context.shape[1] - lengths).unsqueeze(1)
        positions[~torch.tensor(known)] = -1
        omega = self._pathway_batch([tuple(r) for r in rows], positions.shape[1])
        ctx = self.routing.override(positions, omega, layers=self._layers, first_pass_only=True)
        with ctx if any(known) else nullcontext():
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # -- lm-eval's --use_cache ------------------------------------------------

    def set_cache_hook(self, cache_hook) -> None:
        """Stamp lm-eval's response cache with these settings; refuse one written under others.

        lm-eval keys cached responses by the request alone, so a cache filled
        with ``method=ngd,k=3`` would silently answer a ``k=5`` run.
        """
        super().set_cache_hook(cache_hook)
        db = getattr(cache_hook, "dbdict", None)
        if db is None:
            return
        mine = self._cache_identity()
        theirs = db.get(CACHE_SETTINGS_KEY)
        if theirs is None and len(db) > 0:
            raise CacheSettingsError(
                f"the --use_cache database {getattr(db, 'filename', '')} already holds responses from a run "
                "that was not --model c3po: use another --use_cache path for this run"
            )
        if theirs is not None and theirs != mine:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise CacheSettingsError(
                f"the --use_cache database {getattr(db, 'filename', '')} was written with other c3po settings "
                f"(differing: {', '.join(changed)}); reusing it would mix their results into this run. "
                "Use another --use_cache path, or the same settings to resume."
            )
        db[CACHE_SETTINGS_KEY] = mine

    def _cache_identity(self) -> dict:
        settings = self.c3po.to_dict()
        for volatile in ("diagnostics", "remix_batch_size"):  # change no number
            settings.pop(volatile)
        identity = {"pretrained": str(self.pretrained), "revision": str(getattr(self, "revision", None)),
                    "c3po": json.dumps(settings, sort_keys=True)}
        if self._remixer is not None:
            manifest = self._remixer.store.manifest
            identity["reference"] = json.dumps([s.to_dict() for s in manifest.shards], sort_keys=True)
        return identity

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["c3po"] = self.c3po.to_dict()
        return info
