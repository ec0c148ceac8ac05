"""The methods as the paper defines them: token slots, correct references only, and the ablation knobs."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import ALL_SLOTS, TINY_MC_DOCS, remixer_for

from lm_eval_c3po.remix import C3POConfig
from lm_eval_c3po.retrieve import (
    bandwidth_from_neighbour_distances,
    kernel_weights_from_cosine,
)
from lm_eval_c3po.routing import own_pathways, token_positions, token_slots
from lm_eval_c3po.score import Example, causal_row, choice_loss
from lm_eval_c3po.store import ReferenceStore, StoreMismatchError

SPECS = ["last", "first", "middle", "last:3", "first:3", "middle:3"]


def _requests(count: int = 4):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, (f"Question: {q}\nAnswer:", " " + c), i)
            for i, (q, choices, _) in enumerate(TINY_MC_DOCS[:count]) for c in choices]


def test_token_slots_name_the_positions_of_every_spec():
    assert token_slots(ALL_SLOTS) == ["first+0", "first+1", "first+2", "middle-1", "middle+0", "middle+1",
                                      "last-2", "last-1", "last-0"]
    # a 7-token context: first 0..2, middle 2..4 around (7 - 1) // 2 = 3, last 4..6
    assert token_positions(ALL_SLOTS, [7]).tolist() == [[0, 1, 2, 2, 3, 4, 4, 5, 6]]
    assert token_positions("middle", [6]).tolist() == [[2]] and token_positions("first:3", [2]).tolist() == [[0, 1, 1]]


def test_the_store_keeps_the_routing_of_every_slot(slot_store_dir, tiny_store_dir):
    slots = ReferenceStore.load(slot_store_dir)
    last = ReferenceStore.load(tiny_store_dir)
    assert slots.token_slots == token_slots(ALL_SLOTS) and last.token_slots == ["last-0"]
    assert slots.routing.shape == (len(last), 9, *last.routing.shape[1:])
    rows, layers = np.arange(len(last)), range(last.model.num_layers)
    np.testing.assert_allclose(slots.pathways(rows, ["last-0"], layers), last.routing, atol=1e-6)
    assert not np.allclose(slots.pathways(rows, ["first+0"], layers), last.routing, atol=1e-3)


def _bf16_ulp(x: np.ndarray) -> np.ndarray:
    """The spacing of bfloat16 numbers (8 significant bits) at ``|x|``."""
    return np.exp2(np.floor(np.log2(np.maximum(np.abs(x), 1e-30))) - 7)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_omega0_reproduces_base_for_every_token_spec(tiny_model_dir, slot_store_dir, dtype):
    """kernel_regression with alpha=1 writes each context's own pathway back at every slot: no change.

    float32: equal within 2e-4 (the prefix-cached path sums in another order). bfloat16: the re-mixing path
    follows HFLM's numerics (log-softmax and sums in the logits' dtype), so a log-likelihood differs from
    base by at most one bf16 spacing (kernel order), and most are bit-equal.
    """
    from lm_eval_c3po.lm_eval_model import C3POLM

    common = dict(pretrained=str(tiny_model_dir), device="cpu", dtype=dtype, batch_size=4)
    base = np.array([ll for ll, _ in C3POLM(**common).loglikelihood(_requests())])
    for spec in SPECS:
        lm = C3POLM(**common, method="kernel_regression", alpha=1.0, tokens=spec, reference=str(slot_store_dir))
        got = np.array([ll for ll, _ in lm.loglikelihood(_requests())])
        if dtype == "float32":
            assert np.abs(got - base).max() <= 2e-4, spec
        else:
            assert (np.abs(got - base) <= _bf16_ulp(base)).all(), (spec, got - base)
            assert (got == base).mean() >= 0.75, (spec, got - base)


def test_a_run_needing_slots_the_store_lacks_is_refused(tiny_model_dir, tiny_store_dir):
    from lm_eval_c3po.lm_eval_model import C3POLM

    with pytest.raises(StoreMismatchError, match=r"missing \['first\+0'\].*--tokens"):
        C3POLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", method="ngd", tokens="first",
               reference=str(tiny_store_dir))


def test_only_correctly_answered_references_are_neighbours(lm, tiny_store_dir):
    full = ReferenceStore.load(tiny_store_dir)
    assert full.manifest.build["keep"] == "all" and not full.correct.all()  # the fixture stores wrong answers
    remixer = remixer_for(lm, tiny_store_dir, method="ngd", k=4)
    assert len(remixer.store) == int(full.correct.sum())
    assert set(remixer.store.ids) == {full.ids[i] for i in np.flatnonzero(full.correct)}
    neighbours, _ = remixer.retriever([f"Question: {q}\nAnswer:" for q, _, _ in TINY_MC_DOCS])
    found = {remixer.store.ids[i] for i in neighbours.indices[neighbours.valid].tolist()}
    assert found and found <= {full.ids[i] for i in np.flatnonzero(full.correct)}


def test_icl_demonstrations_carry_lm_evals_single_delimiter(lm, tiny_store_dir):
    remixer = remixer_for(lm, tiny_store_dir, method="icl", k=1)
    (request,) = _requests(1)[:1]
    (prefixed,) = remixer.with_demonstrations([request])
    neighbours, _ = remixer.retriever([request.args[0]])
    row = int(neighbours.indices[0, 0])
    text = remixer.store.texts[row]
    demo = text["question"] + text["choices"][int(remixer.store.gold[row])]
    assert prefixed.args[0] == demo + "\n\n" + request.args[0]
    assert "Answer: " + text["choices"][int(remixer.store.gold[row])].lstrip() in demo and "  " not in demo


def test_epsilon_ball_sizes_and_fallbacks_reach_diagnostics_and_a_summary(lm, tiny_store_dir, tmp_path, caplog):
    diag = tmp_path / "diag.jsonl"
    remixer = remixer_for(lm, tiny_store_dir, method="kernel_regression", eps=1e-6, eps_candidates=3, alpha=0.5,
                       diagnostics=str(diag))
    texts = [f"Question: {q}\nAnswer:" for q, _, _ in TINY_MC_DOCS[:3]]
    remixer.pathways(texts, [lm.tok_encode(t) for t in texts], progress=False)
    records = [json.loads(line) for line in diag.read_text().splitlines()]
    assert [r["ball"] for r in records] == [{"size": 1, "fallback": True}] * 3  # nothing within 1e-6: nearest
    assert remixer.ball.contexts == 3 and remixer.ball.fallbacks == 3
    assert "3 contexts" in remixer.ball.summary(1e-6, 3) and "3 empty balls fell back" in remixer.ball.summary(1e-6, 3)


def test_gold_loss_is_the_gold_continuations_nll(lm):
    context = lm.tok_encode("Question: Where does the sun rise?\nAnswer:")
    choices = [lm.tok_encode(" west"), lm.tok_encode(" east is where")]
    example = Example(context, choices, 1)
    layers = [lm.routing.num_layers - 1]
    omega = own_pathways(lm.model, lm.routing, layers, [context], lm.max_length)
    gold = choice_loss(lm.model, lm.routing, layers, "last", [[example]], torch.ones(1, 1), lm.max_length,
                       objective="gold")
    both = choice_loss(lm.model, lm.routing, layers, "last", [[example]], torch.ones(1, 1), lm.max_length,
                       cached=False)
    with torch.no_grad():
        ll = both.scorer(omega, 1)  # both choices' log-likelihoods
        assert torch.allclose(gold(omega), -ll[1:2], atol=1e-5)
        assert torch.allclose(both(omega), -torch.log_softmax(ll, 0)[1:2], atol=1e-5)
    assert len(gold.scorer.rows) == 1  # only the gold answer is scored


def test_mode_finding_over_text_neighbours_moves_towards_them(lm, tiny_store_dir):
    text = "Question: Where does the sun rise?\nAnswer:"
    context = lm.tok_encode(text)
    text_mode = remixer_for(lm, tiny_store_dir, method="mode_finding", mode_neighbourhood="text", k=2, alpha=0.0,
                         mode_iters=1, core_experts=lm.routing.num_experts)
    (omega,) = text_mode.pathways([text], [context], progress=False)[0]
    neighbours, _ = text_mode.retriever([text])
    refs = torch.from_numpy(text_mode.store.pathways(neighbours.indices[0].numpy(), ["last-0"],
                                                     text_mode.layer_ids))
    # alpha 0, one iteration: a kernel-weighted average of exactly the two text neighbours' pathways
    weights = np.linalg.lstsq(refs.flatten(1).T.numpy(), omega.flatten().numpy(), rcond=None)[0]
    assert np.allclose(weights.sum(), 1, atol=1e-4) and (weights > -1e-4).all()
    assert torch.allclose(refs.flatten(1).T @ torch.from_numpy(weights).float(), omega.flatten(), atol=1e-4)


def test_polynomial_kernel_takes_degree_and_coef0(lm, tiny_store_dir):
    remixer = remixer_for(lm, tiny_store_dir, method="ngd", kernel="polynomial", degree=3, coef0=0.5)
    assert (remixer.retriever.kernel.name, remixer.retriever.kernel.degree, remixer.retriever.kernel.coef0) == (
        "polynomial", 3, 0.5)
    cos = torch.tensor([[0.8, 0.6]])
    want = torch.tensor([1.3 ** 3, 1.1 ** 3])
    assert torch.allclose(kernel_weights_from_cosine(cos, remixer.retriever.kernel), want / want.sum())


def test_store_bandwidth_puts_the_kth_neighbour_at_one_over_e():
    # neighbourhoods with distances^2 (0.4, 0.6) and (0.2, 0.8): spreads 0.1 and 0.3 -> median 0.2 -> h^2 = 0.2
    distances = np.sqrt(np.array([[0.4, 0.6], [0.2, 0.8], [0.3, 0.5]]))  # third spread 0.1
    h = bandwidth_from_neighbour_distances(distances)
    assert h == pytest.approx(np.sqrt(0.1))
    assert bandwidth_from_neighbour_distances(np.array([[0.5, np.inf]])) is None  # no second neighbour


def test_kernels_differ_under_the_store_bandwidth():
    cos = torch.tensor([[0.8, 0.75, 0.7]])
    h = bandwidth_from_neighbour_distances(np.sqrt(2 - 2 * cos.double().numpy()))
    gaussian = kernel_weights_from_cosine(cos, "gaussian", h)
    linear = kernel_weights_from_cosine(cos, "linear")
    median = kernel_weights_from_cosine(cos, "gaussian", None)
    assert torch.allclose(gaussian, torch.tensor([[1.0, np.exp(-0.5), np.exp(-1.0)]]).float() /
                          (1 + np.exp(-0.5) + np.exp(-1.0)), atol=1e-5)
    assert (gaussian[0, 0] - gaussian[0, 2]) > 3 * (median[0, 0] - median[0, 2])  # the median rule is near-flat
    assert (gaussian - linear).abs().max() > 0.1


def test_generation_re_mixes_prompts_longer_than_the_window(tiny_model_dir, tiny_store_dir, monkeypatch):
    from lm_eval.api.instance import Instance

    from lm_eval_c3po.lm_eval_model import C3POLM

    model = C3POLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", method="kernel_regression",
                   alpha=0.0, reference=str(tiny_store_dir), max_length=24)
    long_prompt = "Question: " + " ".join(["the sun rises in the east"] * 8) + "\nAnswer:"
    assert len(model.tok_encode(long_prompt)) > 24
    requests = [Instance("generate_until", {}, (long_prompt, {"until": ["\n"], "max_gen_toks": 4}), 0)]
    applied = []
    real = model.routing.override

    def spy(positions, omega, layers, first_pass_only=False):
        applied.append(positions.clone())
        return real(positions, omega, layers, first_pass_only=first_pass_only)

    monkeypatch.setattr(model.routing, "override", spy)
    model.generate_until(requests, disable_tqdm=True)
    assert applied and (applied[0] >= 0).all()  # the truncated prompt was found and re-mixed
    assert applied[0][0, 0].item() == 24 - 4 - 1  # its last token in a window of max_length - max_gen_toks


def test_hooked_scoring_reads_the_own_pathway_from_lm_evals_row(tiny_model_dir, tiny_store_dir, monkeypatch):
    """A context longer than the window: the pathway comes from the truncated row lm-eval scores."""
    from lm_eval.api.instance import Instance

    from lm_eval_c3po.lm_eval_model import C3POLM

    model = C3POLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", method="kernel_regression",
                   alpha=1.0, reference=str(tiny_store_dir), max_length=16)
    monkeypatch.setattr(model._remixer, "scores_from_capture", lambda _: False)  # the _model_call hook path
    seen = []
    real = model._remixer.pathways
    monkeypatch.setattr(model._remixer, "pathways", lambda t, c, p=True: seen.extend(c) or real(t, c, p))
    context = "Question: " + " ".join(["water boils"] * 10) + "\nAnswer:"
    requests = [Instance("loglikelihood", {}, (context, " yes"), 0), Instance("loglikelihood", {}, (context, " no"), 0)]
    out = model.loglikelihood(requests)
    base = C3POLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", max_length=16).loglikelihood(requests)
    (tokens,) = seen
    ids = model.tok_encode(context)
    row, context_len = causal_row(ids, model.tok_encode(" yes"), 16)
    assert len(ids) > 16 and tokens == row[:context_len]  # the context part of lm-eval's row, not ids[-16:]
    assert np.allclose([ll for ll, _ in out], [ll for ll, _ in base], atol=1e-5)  # alpha=1: omega0 exactly


def test_use_cache_stamp_includes_remix_batch_size(lm):
    identity = lm._cache_identity()
    assert "remix_batch_size" in json.loads(identity["c3po"])
    assert "diagnostics" not in json.loads(identity["c3po"])


def test_mode_neighbourhood_and_loss_are_validated():
    from lm_eval_c3po.remix import C3POConfigError

    with pytest.raises(C3POConfigError, match="unknown loss 'nll'; choose one of: choices, gold"):
        C3POConfig.from_model_args({"loss": "nll"})
    with pytest.raises(C3POConfigError, match="mode_neighbourhood"):
        C3POConfig.from_model_args({"mode_neighbourhood": "store"})
    with pytest.raises(C3POConfigError, match="bandwidth"):
        C3POConfig.from_model_args({"bandwidth": "silverman"})
    assert C3POConfig.from_model_args({"bandwidth": "0.3"}).bandwidth == 0.3
    assert C3POConfig.from_model_args({"keep_best": "false"}).keep_best is False


def test_logged_ball_summary_at_the_end_of_a_run(tiny_model_dir, tiny_store_dir, caplog):
    from lm_eval_c3po.lm_eval_model import C3POLM

    model = C3POLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", method="kernel_regression",
                   alpha=0.5, eps=0.9, reference=str(tiny_store_dir))
    with caplog.at_level(logging.INFO, logger="lm_eval_c3po.lm_eval_model"):
        model.loglikelihood(_requests(2))
    assert "epsilon-ball eps=0.9 over the 64 nearest references: 2 contexts" in caplog.text


def test_cost_meter_counts_token_layer_evaluations_by_hand(lm):
    from lm_eval_c3po.score.cost import CostMeter

    meter = CostMeter(lm.model)
    layers = len(lm.model.model.layers)
    ids = torch.randint(2, 300, (2, 5))
    with torch.no_grad():
        with meter.phase("own"):
            lm.model(ids)
        lm.model(ids)  # outside any phase: not counted
    with meter.phase("optimisation"), torch.enable_grad():
        lm.model(ids[:1, :3])
    assert meter.take() == {"own": 2 * 5 * layers, "neighbours": 0, "optimisation_forward": 3 * layers,
                            "optimisation_backward": 3 * layers}
    assert meter.take()["own"] == 0  # taken counts are reset
    meter.close()


def test_diagnostics_record_cost_and_the_prediction_at_every_ngd_step(lm, tiny_store_dir, tmp_path):
    diag = tmp_path / "diag.jsonl"
    remixer = remixer_for(lm, tiny_store_dir, method="ngd", steps=3, record_steps=True, diagnostics=str(diag))
    docs = TINY_MC_DOCS[:3]
    texts = [f"Question: {q}\nAnswer:" for q, _, _ in docs]
    conts = [[lm.tok_encode(" " + c) for c in choices] for _, choices, _ in docs]
    scores = remixer.score(texts, [lm.tok_encode(t) for t in texts], conts, progress=False)
    records = [json.loads(line) for line in diag.read_text().splitlines()]
    assert len(records) == 3
    for record, per_choice, choices in zip(records, scores, conts):
        assert len(record["step_predictions"]) == 4  # omega0 and three steps
        assert all(0 <= p < len(choices) for p in record["step_predictions"])
        assert set(record["cost"]) == {"own", "neighbours", "optimisation_forward", "optimisation_backward"}
        assert record["cost"]["own"] > 0 and record["cost"]["neighbours"] > 0
        assert record["cost"]["optimisation_backward"] > 0 and record["cost"]["optimisation_forward"] > 0
    # step 0 is the model's own pathway: its prediction is base's argmax
    from lm_eval_c3po.lm_eval_model import C3POLM  # noqa: F401  (lm is a base C3POLM)

    for record, text, choices in zip(records, texts, docs):
        base = [ll for ll, _ in lm.loglikelihood(_requests_for(text, choices[1]))]
        assert record["step_predictions"][0] == int(np.argmax(base))


def _requests_for(text: str, choices: list[str]):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, (text, " " + c), 0) for c in choices]
