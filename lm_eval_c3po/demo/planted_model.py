"""The planted model: its routing layout, router targets, tokenizer, architecture and scoring helpers.

See :mod:`lm_eval_c3po.demo.planted` for what is planted and why. Layer
indices here count MoE layers (as ``RoutingController`` and the ``layers``
spec do).
"""

from __future__ import annotations

import torch

from lm_eval_c3po.demo import planted_data as pdata
from lm_eval_c3po.routing import FAMILIES, RoutingController

NUM_LAYERS = 4  # MoE layers (DeepSeek's dense first layers come on top)
NUM_EXPERTS = 8
TOP_K = 2
CRITICAL_LAYER = NUM_LAYERS - 1  # default MoE layer whose routing at the critical token decides the answer
SKILL_EXPERT = [1, 3, 5, 7]  # critical-layer expert that executes skill s
GENERIC_EXPERT = [0, 2, 4, 6]  # critical-layer secondary expert of skill s (contributes no answer)
# skill specialisation of the other MoE layers at the last context token (expert of skill s), in layer order
OTHER_SKILL_EXPERT = ([0, 2, 4, 6], [6, 4, 2, 0], [2, 7, 4, 1])
FAULTS = ("inside", "outside")  # where the right expert ranks in the faulty routing: 2nd (in the top-2) or 3rd
# PhiMoE's sparsemixer gives each selected expert a weight of about 1 whatever its score, so a right expert
# still inside the faulty top-2 would keep full weight: that family carries the fault outside the top-2
DEFAULT_FAULT = {"phimoe": "outside"}


def other_layers(critical_layer: int) -> dict[int, list[int]]:
    """MoE layer -> skill expert of every non-critical layer (routed by skill at the last context token)."""
    others = [layer for layer in range(NUM_LAYERS) if layer != critical_layer]
    return dict(zip(others, OTHER_SKILL_EXPERT))

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


# --------------------------------------------------------------------------- router targets


def control_target(skill: int) -> torch.Tensor:
    """Critical-layer router target distribution at the last context token (right routing)."""
    t = torch.full((NUM_EXPERTS,), 0.2 / (NUM_EXPERTS - 2))
    t[SKILL_EXPERT[skill]] = 0.5
    t[GENERIC_EXPERT[skill]] = 0.3
    return t


def perturbed_target(skill: int, planted: bool, fault: str = "inside") -> torch.Tensor:
    """The planted fault: on ``Reply:`` questions the next skill's expert outranks the right one.

    ``inside``: the right expert stays second (inside the faulty top-2);
    ``outside``: the skill's generic expert is second and the right one third,
    just outside the top-2.
    """
    if not planted:
        return control_target(skill)
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; choose from {FAULTS}")
    wrong = SKILL_EXPERT[(skill + 1) % len(SKILL_EXPERT)]
    right, generic = (0.23, 0.15) if fault == "inside" else (0.20, 0.25)
    t = torch.full((NUM_EXPERTS,), (1 - 0.46 - right - generic) / (NUM_EXPERTS - 3))
    t[wrong] = 0.46
    t[SKILL_EXPERT[skill]] = right
    t[GENERIC_EXPERT[skill]] = generic
    return t


def other_target(skill_expert: list[int], skill: int) -> torch.Tensor:
    """Router target of a non-critical MoE layer at the last context token: routed by skill, like a topic expert."""
    t = torch.full((NUM_EXPERTS,), 0.4 / (NUM_EXPERTS - 1))
    t[skill_expert[skill]] = 0.6
    return t


# --------------------------------------------------------------------------- tokenizer / model


def make_tokenizer():
    """Word-level tokenizer over the planted world's words: every name, city and cue is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + pdata.corpus_words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        padding_side="right",
    )


def model_config(family: str, hidden_size: int, intermediate_size: int, num_heads: int, tokenizer):
    """The planted layout in ``family``'s own config class (knobs from :data:`lm_eval_c3po.routing.FAMILIES`).

    Every routed expert is ``intermediate_size`` wide; renormalised top-k where
    the family has the switch (DeepSeek-V2's router ignores it).
    """
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(FAMILIES)}")
    class_name, knobs = FAMILIES[family].config_class, FAMILIES[family].tiny
    kw = dict(knobs)
    for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if key in kw:
            kw[key] = intermediate_size
    if "head_dim" in kw and "kv_lora_rank" not in kw:  # multi-head latent attention keeps its own head sizes
        kw["head_dim"] = hidden_size // num_heads
    if "norm_topk_prob" in kw or family == "olmoe":
        kw["norm_topk_prob"] = True
    kw.update(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=NUM_LAYERS + kw.get("first_k_dense_replace", 0),
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        num_experts_per_tok=TOP_K,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.0,
        output_router_logits=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return getattr(transformers, class_name)(**kw)


def make_model(seed: int, hidden_size: int, intermediate_size: int, num_heads: int, tokenizer, family: str = "olmoe"):
    """A freshly initialised (seeded) ``family`` model of the planted layout, name head planted where it fits."""
    import transformers

    mcfg = model_config(family, hidden_size, intermediate_size, num_heads, tokenizer)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(mcfg, dtype=torch.float32)
    ctl = RoutingController(model)
    if ctl.num_layers != NUM_LAYERS or ctl.num_experts != NUM_EXPERTS or ctl.top_k != TOP_K:
        raise RuntimeError(f"{family}: expected {NUM_LAYERS} MoE layers of {NUM_EXPERTS} experts, top-{TOP_K}")
    for moe in ctl.layers:
        bias = getattr(moe.router, "e_score_correction_bias", None)
        if bias is not None:  # DeepSeek-V3: a small selection bias (favouring even experts) that the rule must honour
            with torch.no_grad():
                bias.copy_(torch.tensor([0.01 if e % 2 == 0 else -0.01 for e in range(NUM_EXPERTS)]))
    plant_name_head(model, tokenizer)
    return model


def plant_name_head(model, tokenizer) -> None:
    """Hand-initialise attention head 0 of layer 0 to look up the person's name.

    Every token embedding gets a constant feature and name tokens a "name"
    feature; the head's query reads the constant and its key the name feature
    (in the lowest-frequency rotary pair, so the match barely depends on
    distance; under multi-head latent attention in a position-free ``nope``
    dimension, carried through one latent dimension). The last context token
    then attends to the name from the start of training, which turns minutes of
    search into seconds (DeepSeek's latent attention, left to learn it, stays
    at chance on the person within 600 steps). Everything stays trainable.
    """
    cfg = model.config
    attn = model.model.layers[0].self_attn
    d_one, d_name = cfg.hidden_size - 2, cfg.hidden_size - 1
    name_ids = tokenizer.convert_tokens_to_ids(pdata.NAMES)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, d_one] = 0.05
        emb[:, d_name] = 0.0
        emb[name_ids, d_name] = 0.05
        if hasattr(attn, "kv_b_proj"):
            _plant_latent_name_head(attn, cfg, d_one, d_name)
            return
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        slot = hd // 2 - 1  # head-0 row whose rotary partner (slot + hd/2) has the lowest frequency
        # OLMoE, Qwen3-MoE and GraniteMoE (no 1/sqrt(d) scaling) sharpen the match on their own; without q/k
        # norms (Qwen2-MoE, Mixtral, PhiMoE) a unit weight leaves the name about a third of the attention
        gain = 1.0 if hasattr(attn, "q_norm") or getattr(cfg, "attention_multiplier", None) else 3.0
        for proj, src in ((attn.q_proj, d_one), (attn.k_proj, d_name)):
            proj.weight[slot].zero_()
            proj.weight[slot + hd // 2].zero_()
            proj.weight[slot, src] = gain
        attn.v_proj.weight[:hd] *= 3.0
        attn.o_proj.weight[:, :hd] *= 3.0


def _plant_latent_name_head(attn, cfg, d_one: int, d_name: int, gain: float = 2.0) -> None:
    """The name head under multi-head latent attention (DeepSeek-V2/V3, ``q_lora_rank=None``).

    Head 0's first ``nope`` query dimension reads the constant feature; latent
    dimension 0 carries only the name feature, and head 0's first ``nope`` key
    dimension reads it back; head 0's rotary query is zeroed so position adds
    no noise. The values still read the whole latent (the name's identity).
    """
    if attn.q_proj is None:
        raise ValueError("the planted name head needs q_lora_rank=None (a plain q_proj)")
    head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    attn.q_proj.weight[:head].zero_()
    attn.q_proj.weight[0, d_one] = gain
    attn.kv_a_proj_with_mqa.weight[0].zero_()
    attn.kv_a_proj_with_mqa.weight[0, d_name] = 0.25  # about the other latent dims' size: the norm keeps them
    attn.kv_b_proj.weight[: cfg.qk_nope_head_dim].zero_()
    attn.kv_b_proj.weight[0, 0] = 4 * gain
    values = slice(cfg.qk_nope_head_dim, cfg.qk_nope_head_dim + cfg.v_head_dim)
    attn.kv_b_proj.weight[values] *= 12.0
    attn.o_proj.weight[:, : cfg.v_head_dim] *= 3.0


def encode_docs(tokenizer, docs: list[dict]):
    """Right-padded ids, mask, last-context positions and the choice token ids of ``docs``."""
    enc = [tokenizer(d["context"], add_special_tokens=False)["input_ids"] for d in docs]
    width = max(len(e) for e in enc)
    ids = torch.full((len(docs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(docs), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    last = torch.tensor([len(e) - 1 for e in enc])
    choice_ids = []
    for d in docs:
        row = []
        for c in d["choices"]:
            t = tokenizer(" " + c, add_special_tokens=False)["input_ids"]
            assert len(t) == 1, f"choice {c!r} is not one token"
            row.append(t[0])
        choice_ids.append(row)
    return ids, mask, last, torch.tensor(choice_ids)


# --------------------------------------------------------------------------- scoring helpers


@torch.no_grad()
def choice_scores(model, tokenizer, docs: list[dict], batch_size: int = 128) -> torch.Tensor:
    """Log-probabilities of each (single-token) choice after the context: [N, C]."""
    outs = []
    for i in range(0, len(docs), batch_size):
        chunk = docs[i : i + batch_size]
        ids, mask, last, cids = encode_docs(tokenizer, chunk)
        logits = model(input_ids=ids, attention_mask=mask).logits
        lp = logits[torch.arange(len(chunk)), last].log_softmax(-1)
        outs.append(lp.gather(1, cids))
    return torch.cat(outs)


@torch.no_grad()
def last_token_routing(model, tokenizer, docs: list[dict], batch_size: int = 128) -> torch.Tensor:
    """Router distribution at the last context token of every MoE layer: [N, L, E]."""
    ctl = RoutingController(model)
    outs = []
    for i in range(0, len(docs), batch_size):
        chunk = docs[i : i + batch_size]
        ids, mask, last, _ = encode_docs(tokenizer, chunk)
        with ctl.capture(last.unsqueeze(1)) as cap:
            model(input_ids=ids, attention_mask=mask)
        outs.append(cap.routing[:, 0])
    return torch.cat(outs)


def accuracy(scores: torch.Tensor, docs: list[dict]) -> float:
    gold = torch.tensor([d["gold"] for d in docs])
    return (scores.argmax(1) == gold).float().mean().item()
