"""The C3PO methods on a tiny model: NGD, oracle, kernel regression, determinism, batch-size independence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_MC_DOCS, remixer_for

from lm_eval_c3po import remix as methods
from lm_eval_c3po.lm_eval_model import score_with_pathways
from lm_eval_c3po.remix import Remixer
from lm_eval_c3po.score import Example, TrieScorer, choice_loss


@pytest.fixture(scope="module")
def store_dir(tiny_store_dir):
    return tiny_store_dir


def _examples(lm, docs):
    out = []
    for question, choices, gold in docs:
        context = f"Question: {question}\nAnswer:"
        encoded = [lm._encode_pair(context, " " + c) for c in choices]
        out.append(Example(encoded[0][0], [e[1] for e in encoded], gold))
    return out


def test_ngd_lowers_the_neighbourhood_loss(lm, store_dir):
    remixer = remixer_for(lm, store_dir, method="ngd", steps=10)
    texts = [f"Question: {q}\nAnswer:" for q, _, _ in TINY_MC_DOCS]
    neighbours, weights = remixer.retriever(texts)
    loss = remixer.neighbourhood_loss(neighbours, weights)
    contexts = [lm.tok_encode(t) for t in texts]
    omega0 = remixer.own_pathways(contexts)
    free = methods.core_expert_mask(omega0, remixer.config.core_experts, lm.routing.top_k)
    result = methods.optimise_pathway(omega0, loss, free, steps=10)
    first, best = result.losses[:, 0], result.best_loss
    assert (best <= first).all()
    assert (best < first - 1e-4).float().mean() >= 0.75  # most contexts improve measurably


def test_oracle_lowers_each_samples_own_loss(lm, store_dir):
    remixer = remixer_for(lm, store_dir, method="ngd", steps=10)
    rng = np.random.default_rng(0)
    words = ["sun", "water", "bread", "fox", "whale", "spoon", "Paris", "book", "east", "soup"]
    docs = []
    for n in range(20):  # 20 samples, random 3-way questions over the tokenizer's corpus words
        choice = list(rng.choice(words, 3, replace=False))
        docs.append((f"Which word comes next, {words[n % 10]} or {choice[0]}?", choice, int(rng.integers(3))))
    examples = _examples(lm, docs)
    own = choice_loss(lm.model, lm.routing, remixer.layer_ids, "last", [[e] for e in examples],
                      torch.ones(len(examples), 1), lm.max_length, cached=False)
    with torch.no_grad():
        before = own(remixer.own_pathways([e.context for e in examples]))
        after = own(remixer.oracle(examples))
    assert (after < before).sum().item() == 20


def test_kernel_regression_k1_alpha0_writes_the_neighbours_pathway(lm, store_dir):
    experts = lm.routing.num_experts
    remixer = remixer_for(lm, store_dir, method="kernel_regression", k=1, alpha=0.0, core_experts=experts)
    text = "Question: Where does the sun rise?\nAnswer:"
    context = lm.tok_encode(text)
    (omega,) = remixer.pathways([text], [context])[0]
    neighbours, _ = remixer.retriever([text])
    row = int(neighbours.indices[0, 0])
    assert remixer.store.texts[row]["question"] != text  # the question itself (cosine 1) is dropped as a near-duplicate
    expected = torch.from_numpy(np.asarray(remixer.store.routing[row][remixer.layer_ids]))
    assert torch.allclose(omega, expected, atol=1e-6)
    # Through routing capture: the experts the routers hand on at that token are the neighbour's top-k.
    used = {}
    layer_ids = remixer.layer_ids
    position = torch.tensor([[len(context) - 1]])
    with lm.routing.override(position, omega.unsqueeze(0).unsqueeze(0), layers=layer_ids):
        handles = [lm.routing.layers[i].router.register_forward_hook(
            lambda m, a, out, i=i: used.__setitem__(i, out[2][len(context) - 1].tolist())) for i in layer_ids]
        with torch.no_grad():
            lm.model(torch.tensor([context]))
        for h in handles:
            h.remove()
    for slot, i in enumerate(layer_ids):
        assert set(used[i]) == set(expected[slot].topk(lm.routing.top_k).indices.tolist())


def test_same_seed_same_numbers(lm, store_dir):
    texts = [f"Question: {q}\nAnswer:" for q, _, _ in TINY_MC_DOCS[:4]]
    contexts = [lm.tok_encode(t) for t in texts]
    a = remixer_for(lm, store_dir, method="ngd", seed=7).pathways(texts, contexts)
    b = remixer_for(lm, store_dir, method="ngd", seed=7).pathways(texts, contexts)
    assert len(a) == len(b) == 4 and all(torch.equal(x, y) for x, y in zip(a, b))


def test_batch_sizes_do_not_change_loglikelihoods(tiny_model_dir, store_dir):
    from lm_eval.api.instance import Instance

    from lm_eval_c3po.lm_eval_model import C3POLM

    requests = []
    for i, (question, choices, _) in enumerate(TINY_MC_DOCS[:5]):
        for c in choices:
            requests.append(Instance("loglikelihood", {}, (f"Question: {question}\nAnswer:", " " + c), i))
    results = {}
    for batch_size, remix_batch_size in ((1, 1), (5, 3)):
        model = C3POLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=batch_size,
                       method="ngd", reference=str(store_dir), remix_batch_size=remix_batch_size)
        results[batch_size] = np.array([r[0] for r in model.loglikelihood(requests, disable_tqdm=True)])
    assert np.abs(results[1] - results[5]).max() <= 1e-5


def test_remixing_changes_scores_and_writes_diagnostics(tiny_model_dir, store_dir, tmp_path):
    from lm_eval.api.instance import Instance

    from lm_eval_c3po.lm_eval_model import C3POLM

    requests = [Instance("loglikelihood", {}, (f"Question: {q}\nAnswer:", " " + c), i)
                for i, (q, choices, _) in enumerate(TINY_MC_DOCS[:3]) for c in choices]
    base = C3POLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", method="base")
    diag = tmp_path / "diag.jsonl"
    ngd = C3POLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", method="ngd",
                 reference=str(store_dir), diagnostics=str(diag))
    a = np.array([r[0] for r in base.loglikelihood(requests, disable_tqdm=True)])
    b = np.array([r[0] for r in ngd.loglikelihood(requests, disable_tqdm=True)])
    assert np.abs(a - b).max() > 1e-4
    records = [json.loads(line) for line in diag.read_text().splitlines()]
    assert len(records) == 3  # one per distinct context, computed once for all its choices
    for record in records:
        assert len(record["neighbours"]) == 3 and len(record["loss"]) == 11
        assert len(record["before"]["topk"]) == len(record["critical_layers"])


def test_loglikelihood_rolling_runs_unmixed_with_one_warning(tiny_model_dir, store_dir, caplog):
    from lm_eval.api.instance import Instance

    from lm_eval_c3po.lm_eval_model import C3POLM

    base = C3POLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", method="base")
    ngd = C3POLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", method="ngd",
                 reference=str(store_dir))
    requests = [Instance("loglikelihood_rolling", {}, ("The sun rises in the east.",), 0)]
    with caplog.at_level("WARNING"):
        a = base.loglikelihood_rolling(requests, disable_tqdm=True)
        b = ngd.loglikelihood_rolling(requests * 2, disable_tqdm=True)
        ngd.loglikelihood_rolling(requests, disable_tqdm=True)
    assert a[0] == b[0] == b[1]
    assert sum("loglikelihood_rolling" in r.message for r in caplog.records) == 1


def test_generate_until_remixes_the_prefill_at_the_last_prompt_token(tiny_model_dir, store_dir, monkeypatch):
    from lm_eval.api.instance import Instance

    from lm_eval_c3po.lm_eval_model import C3POLM

    model = C3POLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", method="kernel_regression",
                   reference=str(store_dir), alpha=0.0, batch_size=2)
    prompts = ["Question: Where does the sun rise?\nAnswer:", "Question: Is the fox quick?\nAnswer:"]
    requests = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}), i)
                for i, p in enumerate(prompts)]
    applied = []
    real_override = model.routing.override

    def spy(positions, omega, layers, first_pass_only=False):
        applied.append((positions.clone(), first_pass_only))
        return real_override(positions, omega, layers, first_pass_only=first_pass_only)

    monkeypatch.setattr(model.routing, "override", spy)
    out = model.generate_until(requests, disable_tqdm=True)
    assert len(out) == 2 and all(isinstance(text, str) for text in out)
    assert applied and all(first for _, first in applied)  # the prefill only, not the decoding steps
    positions = torch.cat([p for p, _ in applied])
    widths = [len(model.tok_encode(p)) for p in prompts]
    assert set(positions[:, 0].tolist()) == {max(widths) - 1}  # left padding: the last prompt token is last


def test_use_cache_resumes_and_refuses_other_settings(tiny_model_dir, tiny_task_dir, store_dir, tmp_path,
                                                      monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lm_eval_c3po.lm_eval_model import CacheSettingsError
    calls = []
    real = Remixer._remix
    monkeypatch.setattr(Remixer, "_remix", lambda self, *a: calls.append(1) or real(self, *a))
    cache = str(tmp_path / "cache" / "c3po")
    tasks = TaskManager(include_path=str(tiny_task_dir))

    def run(**extra):
        args = f"pretrained={tiny_model_dir},dtype=float32,method=ngd,reference={store_dir},steps=2"
        args += "".join(f",{k}={v}" for k, v in extra.items())
        return simple_evaluate(model="c3po", model_args=args, tasks=["tiny_mc"], task_manager=tasks,
                               device="cpu", use_cache=cache, limit=4)

    first = run()
    assert calls  # computed
    calls.clear()
    again = run()
    assert not calls  # every response came from the cache
    assert again["results"]["tiny_mc"]["acc,none"] == first["results"]["tiny_mc"]["acc,none"]
    with pytest.raises(CacheSettingsError, match="differing: c3po"):
        run(k=2)


@pytest.mark.parametrize(("method", "tokens"), [("mode_finding", "last"), ("ngd", "last"), ("ngd", "last:2")])
def test_scoring_from_the_capture_pass_equals_hooked_lm_eval_batches(lm, slot_store_dir, method, tokens):
    """The fast path (one prefix pass per context for its own pathway and all its choices) gives
    the numbers of lm-eval's own padded batches with the same pathways hooked in (several token slots too:
    the hook unfolds the slot-major ``[1, P * L_crit, E]`` pathway)."""
    remixer = remixer_for(lm, slot_store_dir, method=method, steps=4, remix_batch_size=3, tokens=tokens)
    texts = [f"Question: {q}\nAnswer:" for q, _, _ in TINY_MC_DOCS[:5]]
    choices = [[" " + c for c in doc[1]] for doc in TINY_MC_DOCS[:5]]
    contexts = [lm.tok_encode(t) for t in texts]
    conts = [[lm._encode_pair(t, c)[1] for c in cs] for t, cs in zip(texts, choices)]
    assert remixer.scores_from_capture(max(len(c) for cs in conts for c in cs))
    fast = remixer.score(texts, contexts, conts)
    pathways = dict(zip(map(tuple, contexts), remixer.pathways(texts, contexts)))
    requests = [((t, c), ctx, cont) for t, ctx, cs, ccs in zip(texts, contexts, choices, conts)
                for c, cont in zip(cs, ccs)]
    hooked = score_with_pathways(lm, requests, pathways, remixer.layer_ids, tokens)
    flat = [answer for per_context in fast for answer in per_context]
    assert np.abs(np.array([a[0] for a in flat]) - np.array([h[0] for h in hooked])).max() <= 1e-4
    assert [a[1] for a in flat] == [h[1] for h in hooked]


def test_own_routing_from_the_prepared_trie_equals_the_capture_api(lm, store_dir):
    remixer = remixer_for(lm, store_dir, method="ngd")
    examples = _examples(lm, TINY_MC_DOCS[:4])
    scorer = TrieScorer(lm.model, lm.routing, remixer.layer_ids, "last", [[e] for e in examples], lm.max_length)
    expected = remixer.own_pathways([e.context for e in examples])
    assert torch.allclose(scorer.own_routing(), expected, atol=1e-5)


def test_answers_share_their_common_leading_tokens(lm, store_dir):
    """Choices share the last context token and the answer tokens they agree on (one trie per example)."""
    remixer = remixer_for(lm, store_dir, method="ngd")
    context = lm.tok_encode("Question: Which is a mammal?\nAnswer:")
    a, b = lm.tok_encode(" whale")[:1], lm.tok_encode(" fox")[:1]
    example = Example(context, [a, b, a + b], 0)
    scorer = TrieScorer(lm.model, lm.routing, remixer.layer_ids, "last", [[example]], lm.max_length)
    ll, _ = scorer.row_scores(remixer.own_pathways([context]))
    # Inputs after the split: [last], [last], [last, a]: one trie of two nodes serves all three choices.
    (trie,) = scorer.trie_batch().tries
    assert trie.tokens == [context[-1], a[0]] and trie.parent == [-1, 0]
    assert trie.scored == {0: [(0, a[0])], 1: [(0, b[0])], 2: [(0, a[0]), (1, b[0])]}
    naive = choice_loss(lm.model, lm.routing, remixer.layer_ids, "last", [[example]], torch.ones(1, 1),
                        lm.max_length, cached=False)
    with torch.no_grad():
        expected = naive.scorer(remixer.own_pathways([context]), 1)
    assert torch.allclose(ll, expected, atol=1e-5)
