"""Score reference docs, capture their pathways, embed their questions, and stream records to the store.

Scoring goes through :func:`score_with_routing`, i.e. lm-eval's own
``_loglikelihood_tokens`` with a routing recorder around its batches: the log-likelihoods are those of ``--model hf``
(bit for bit at ``--batch_size 1``; at larger sizes up to the float noise of
padding, as between two lm-eval runs of different batch sizes), and the
routing ``[L, E]`` at each context's last token comes from the same forward
passes.

What a record stores per doc: the gold request's context (its token ids,
its text as the question, its embedding, its pathway) and every choice's
continuation (token ids and text, exactly what was scored after the
context). For tasks whose contexts differ per choice (WinoGrande's partial
scoring) the other choices' contexts are not stored: the gold context is
the one the method re-mixes on, and ``question + choices[gold]`` is the text
the model answered correctly.

Docs are scored in fixed batches that never cross a shard boundary, so a
resumed build scores every remaining doc in the same batch as an
uninterrupted one would and writes identical shards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

import torch

from lm_eval_c3po.score import Request, RoutingRecorder, RowPlan
from lm_eval_c3po.store import Record, StoreWriter
from reference_builders.scoring import judge
from reference_builders.tasks import DocRequests

# Docs per scoring call: lm-eval sorts the call's requests by length and batches them by --batch_size.
DOCS_PER_CALL = 128


def score_with_routing(lm, requests: Sequence[Request], tokens: str = "last"
                       ) -> tuple[list[tuple[float, bool]], list[torch.Tensor]]:
    """Score requests exactly as ``--model hf`` does and capture, from the same forward passes, the
    routing (every MoE layer) at each request's context token slots (:class:`RoutingRecorder`).
    ``lm`` is a ``C3POLM``."""
    with lm.hooked(RoutingRecorder(lm.routing, RowPlan(requests, lm.max_length), tokens)) as recorder:
        results = lm._loglikelihood_tokens(list(requests), disable_tqdm=True)
    return results, [recorder.captured[tuple(context)] for _, context, _ in requests]


def encode_request(lm, context: str, continuation: str) -> Request:
    """Tokenise one request exactly as lm-eval's ``TemplateLM.loglikelihood`` does (empty context included)."""
    if context == "":
        continuation_enc = lm.tok_encode(continuation, add_special_tokens=False)
        if lm.prefix_token_id != continuation_enc[0]:
            return (context, continuation), [lm.prefix_token_id], continuation_enc
        return (context, continuation), continuation_enc[:1], continuation_enc[1:]
    context_enc, continuation_enc = lm._encode_pair(context, continuation)
    return (context, continuation), context_enc, continuation_enc


class Harvester:
    """Turns docs into records with one model and one embedder."""

    def __init__(self, lm, embedder, tokens: str = "last"):
        self.lm = lm
        self.embedder = embedder
        self.tokens = tokens  # the token slots whose routing each record keeps

    def records(self, docs: Sequence[DocRequests]) -> list[Record]:
        """One record per doc, in order: lm-eval's verdict, the gold context's pathway, the embedding."""
        requests = [encode_request(self.lm, c, x) for doc in docs for c, x in doc.arguments]
        results, routing = score_with_routing(self.lm, requests, self.tokens)
        embeddings = self.embedder.encode_documents([doc.question for doc in docs])
        out, start = [], 0
        for doc, embedding in zip(docs, embeddings, strict=True):
            stop = start + len(doc.arguments)
            verdict = judge([ll for ll, _ in results[start:stop]], doc.choices, doc.gold)
            gold = start + doc.gold
            out.append(
                Record(
                    task=doc.task,
                    doc_id=doc.doc_id,
                    question=doc.question,
                    choices=[x for _, x in doc.arguments],
                    context_ids=np.asarray(requests[gold][1]),
                    choice_ids=[np.asarray(cont) for _, _, cont in requests[start:stop]],
                    gold=doc.gold,
                    correct=verdict.correct,
                    correct_norm=verdict.correct_norm,
                    routing=routing[gold].float().cpu().numpy(),
                    embedding=embedding,
                )
            )
            start = stop
        return out


def batches(stream: Sequence[DocRequests], shard_size: int) -> Iterator[Sequence[DocRequests]]:
    """The stream cut into scoring calls of at most DOCS_PER_CALL docs, restarting at every shard boundary."""
    for shard_start in range(0, len(stream), shard_size):
        shard = stream[shard_start : shard_start + shard_size]
        for start in range(0, len(shard), DOCS_PER_CALL):
            yield shard[start : start + DOCS_PER_CALL]


def harvest(
    stream: Sequence[DocRequests],
    harvester: Harvester,
    writer: StoreWriter,
    shard_size: int,
    *,
    tag: str = "",
    progress_bar: bool = True,
) -> None:
    """Score every doc of ``stream`` not yet in a finished shard and add it to ``writer``.

    ``tag`` prefixes the messages (a rank's, in a multi-process build, where
    only one rank draws the progress bar so the bars do not overwrite each other).
    """
    from tqdm.auto import tqdm

    done = writer.done_ids()
    resumed = sum(doc.id in done for doc in stream)
    kept = 0
    hidden = {} if progress_bar else {"disable": True}  # when shown, TQDM_DISABLE still applies
    with tqdm(total=len(stream), initial=resumed, unit="doc", desc=f"{tag}harvesting", dynamic_ncols=True,
              **hidden) as bar:
        if resumed:
            tqdm.write(f"{tag}resuming: {resumed} of {len(stream)} docs are in finished shards")
        for batch in batches(stream, shard_size):
            todo = [doc for doc in batch if doc.id not in done]
            if todo:
                kept += sum(writer.add(record) for record in harvester.records(todo))
            bar.update(len(todo))
            bar.set_postfix(kept=kept, refresh=False)
