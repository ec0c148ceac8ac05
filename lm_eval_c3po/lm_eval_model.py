"""``lm_eval --model c3po``: an HFLM whose routers are re-mixed per test context.

The subclass keeps all of HFLM (loading, tokenisation, caching, data-parallel)
and changes two things:

- For the families on the prefix-cached path, :meth:`C3POLM._loglikelihood_tokens`
  scores each context's choices from the same pass that reads its own pathway
  (``Remixer.score``): the prefix is run once, not once per choice.
- Otherwise (and for generation) one pathway omega* is computed per distinct
  context and lm-eval's own padded batches run inside :meth:`C3POLM.hooked`,
  with a :class:`~lm_eval_c3po.score.PathwayOverride` that writes each row's
  pathway at its context positions. The same context manager carries the
  reference builder's :class:`~lm_eval_c3po.score.RoutingRecorder`.

``method=base`` installs no hook at all, so its numbers are ``--model hf``'s.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext

import torch
from lm_eval.models.huggingface import HFLM, normalize_gen_kwargs

from lm_eval_c3po import distributed
from lm_eval_c3po.remix import ANY_TASK, METHODS, C3POConfig, C3POConfigError, Remixer
from lm_eval_c3po.retrieve.embedding import Embedder, EmbedderOptionError, EmbedderOptions
from lm_eval_c3po.routing import RoutingController
from lm_eval_c3po.score import PathwayOverride, Request, RoutingRecorder, RowPlan, causal_row

logger = logging.getLogger(__name__)

CACHE_SETTINGS_KEY = "lm_eval_c3po/settings"
EMBEDDER_PREFIX = "embedder_"  # model_args embedder_dtype=..., embedder_query_prompt=..., ...


class CacheSettingsError(ValueError):
    """An lm-eval ``--use_cache`` database written under other settings."""


class C3POLM(HFLM):
    """HFLM with C3PO test-time expert re-mixing (see ``C3POConfig`` for the model_args)."""

    reads_gold = False  # only the oracle's evaluator (c3po oracle) hands a model the answers

    def __init__(self, pretrained, **kwargs) -> None:
        c3po_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in C3POConfig.field_names()}
        self.c3po = C3POConfig.from_model_args(c3po_kwargs)
        embedder_args = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith(EMBEDDER_PREFIX)}
        try:
            self.embedder_options = EmbedderOptions.from_args(embedder_args, prefix=EMBEDDER_PREFIX)
        except EmbedderOptionError as err:
            raise C3POConfigError(str(err)) from None
        if METHODS[self.c3po.method].needs_gold and not self.reads_gold:
            raise C3POConfigError(
                f"method={self.c3po.method} reads each doc's gold answer, which lm-eval never gives a model: run "
                "`c3po oracle --model ... --tasks ...` (it writes lm-eval results marked as an upper bound)"
            )
        distributed.request_cpu_process_group()  # data-parallel on CPU processes; GPUs stay HFLM's
        super().__init__(pretrained=pretrained, **kwargs)
        distributed.join_cpu_processes(self)
        self.c3po = distributed.per_rank_diagnostics(self.c3po, self.rank, self.world_size)
        self.routing = RoutingController(self.model)
        self.c3po = self.c3po.resolved_for(self.routing)
        self.method = METHODS[self.c3po.method]
        self._hook: PathwayOverride | RoutingRecorder | None = None
        self._warned_rolling = False
        self._remixers = self._load_remixers() if self.method.needs_reference else {}
        # One store for every task: always active. A task-to-store mapping: chosen per task (_by_store).
        self._remixer: Remixer | None = self._remixers.get(ANY_TASK) if len(self._remixers) == 1 else None

    def _load_remixers(self) -> dict[str, Remixer]:
        """One Remixer per store entry of ``reference`` (every store loaded and checked up front)."""
        embedder = Embedder(self.c3po.embedder, device=str(self.device), options=self.embedder_options)
        return {task: Remixer.from_lm(self, dataclasses.replace(self.c3po, reference=paths), embedder)
                for task, paths in self.c3po.stores_by_task().items()}

    # -- one store per task ---------------------------------------------------

    def _by_store(self, requests, run, disable_tqdm: bool):
        """``run(requests, disable_tqdm)`` once per store, each on the requests of the tasks it serves."""
        if len(self._remixers) < 2 and (not self._remixers or ANY_TASK in self._remixers):
            return run(requests, disable_tqdm)
        groups: dict[str, list[int]] = {}
        unmapped = set()
        for n, request in enumerate(requests):
            pattern = self._store_for(request.task_name)
            if pattern is None:
                unmapped.add(request.task_name)
            else:
                groups.setdefault(pattern, []).append(n)
        if unmapped:
            raise C3POConfigError(
                f"no reference store for task(s) {sorted(map(str, unmapped))}: reference= maps only "
                f"{sorted(self._remixers)}; add an entry (TASK=DIR, a glob, or * for every other task)"
            )
        results = [None] * len(requests)
        for pattern, members in groups.items():
            with self._using(self._remixers[pattern]):
                for n, result in zip(members, run([requests[n] for n in members], disable_tqdm)):
                    results[n] = result
        return results

    def _store_for(self, task: str | None) -> str | None:
        """The mapping entry serving ``task``: its exact name first, then the first glob that matches, then ``*``."""
        if task in self._remixers:
            return task
        for pattern in self._remixers:
            if task is not None and pattern != ANY_TASK and fnmatch.fnmatchcase(task, pattern):
                return pattern
        return ANY_TASK if ANY_TASK in self._remixers else None

    @contextmanager
    def _using(self, remixer: Remixer) -> Iterator[None]:
        self._remixer = remixer
        try:
            yield
        finally:
            self._remixer = None

    # -- lm-eval entry points -------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._by_store(requests, self._loglikelihood, disable_tqdm)

    def _loglikelihood(self, requests, disable_tqdm: bool):
        if self.method.rewrites_prompt:
            requests = self._remixer.with_demonstrations(requests)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        if self.method.pathway is not None and not self._warned_rolling:
            logger.warning(
                "c3po: loglikelihood_rolling (perplexity tasks) has no question to retrieve references for; "
                "these requests run with the model's own routing (method=%s is not applied).",
                self.c3po.method,
            )
            self._warned_rolling = True
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._by_store(requests, self._generate_until, disable_tqdm)

    def _generate_until(self, requests, disable_tqdm: bool):
        if self.method.rewrites_prompt:
            requests = self._remixer.with_demonstrations(requests)
        if self.method.pathway is None:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        texts = [req.args[0] for req in requests]
        prompts = [self._generation_prompt(text, req.args[1]) for text, req in zip(texts, requests)]
        pathways = self._remixer.pathways(texts, prompts, progress=self._progress(disable_tqdm))
        keyed = dict(zip(map(tuple, prompts), pathways))
        with self.hooked(PathwayOverride(self.routing, keyed, self.c3po.layer_ids, self.c3po.tokens)):
            result = super().generate_until(requests, disable_tqdm=disable_tqdm)
        self._log_ball_summary()
        return result

    def _generation_prompt(self, text: str, gen_kwargs: dict) -> list[int]:
        """The prompt tokens HFLM's ``generate_until`` will feed the model: its own encoding, left-truncated to
        leave room for ``max_gen_toks`` (so long prompts are re-mixed where the model sees them)."""
        max_gen_toks = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)["max_gen_toks"]
        ids, _ = self.tok_batch_encode([text], left_truncate_len=self.max_length - max_gen_toks,
                                       truncation=self.truncation)
        return ids[0].tolist()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        # Rolling windows (perplexity) carry no cache key: no question, so no re-mixing.
        if self.method.pathway is None or self._hook is not None or any(req[0] is None for req in requests):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        first: dict[tuple[int, ...], tuple] = {}
        for request in requests:
            first.setdefault(tuple(request[1]), request)
        progress = self._progress(disable_tqdm)
        if self._remixer.scores_from_capture(max(len(cont) for _, _, cont in requests)):
            result = self._score_from_capture(requests, {key: req[0][0] for key, req in first.items()}, progress)
        else:
            # Each context's own pathway is read where lm-eval's row of its first request puts it (truncation).
            seen = [causal_row(context, continuation, self.max_length) for _, context, continuation in first.values()]
            pathways = self._remixer.pathways([req[0][0] for req in first.values()],
                                              [tokens[:context_len] for tokens, context_len in seen], progress)
            hook = PathwayOverride(self.routing, dict(zip(first, pathways)), self.c3po.layer_ids, self.c3po.tokens,
                                   RowPlan(requests, self.max_length))
            with self.hooked(hook):
                result = super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        self._log_ball_summary()
        return result

    def _log_ball_summary(self) -> None:
        if self.c3po.eps is not None:
            logger.info(self._remixer.ball.summary(self.c3po.eps, self.c3po.eps_candidates))

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

    # -- routing hooks around lm-eval's own batches ----------------------------

    @contextmanager
    def hooked(self, hook: PathwayOverride | RoutingRecorder) -> Iterator[PathwayOverride | RoutingRecorder]:
        """Run every forward pass lm-eval makes inside the block through ``hook`` (scoring: the hook's
        ``around_call``; generation: a :class:`PathwayOverride`'s ``around_generate``)."""
        if self._hook is not None:
            raise RuntimeError("a routing hook is already active on this model")
        self._hook = hook
        try:
            yield hook
        finally:
            self._hook = None

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        with self._hook.around_call(inps) if self._hook is not None else nullcontext():
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        hook = self._hook if isinstance(self._hook, PathwayOverride) else None
        with hook.around_generate(context, generation_kwargs.get("attention_mask")) if hook else nullcontext():
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
        for volatile in ("diagnostics", "record_steps"):  # change no number (remix_batch_size may: sum order)
            settings.pop(volatile)
        settings["embedder_options"] = self.embedder_options.to_args(EMBEDDER_PREFIX)
        identity = {"pretrained": str(self.pretrained), "revision": str(getattr(self, "revision", None)),
                    "c3po": json.dumps(settings, sort_keys=True)}
        if self._remixers:
            identity["reference"] = json.dumps({task: [s.to_dict() for s in remixer.store.manifest.shards]
                                                for task, remixer in self._remixers.items()}, sort_keys=True)
        return identity

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["c3po"] = self.c3po.to_dict()
        return info


def score_with_pathways(lm: C3POLM, requests: Sequence[Request], pathways: Mapping[tuple[int, ...], torch.Tensor],
                        layers: Sequence[int] | None = None, tokens: str | None = None) -> list[tuple[float, bool]]:
    """lm-eval's ``(log-likelihood, is_greedy)`` of tokenized requests with given pathways written in.

    ``pathways`` are ``{context ids: [1, P * len(layers), E]}`` (slot-major rows of the ``P`` slots of
    ``tokens``); ``layers`` and ``tokens`` default to the run's. For analysis (e.g. the oracle): the rows
    are lm-eval's own padded batches, as ``--model c3po`` would score them.
    """
    layers = tuple(layers) if layers is not None else lm.c3po.layer_ids
    tokens = tokens or lm.c3po.tokens
    with lm.hooked(PathwayOverride(lm.routing, pathways, layers, tokens, RowPlan(requests, lm.max_length))):
        return lm._loglikelihood_tokens(list(requests), disable_tqdm=True)
