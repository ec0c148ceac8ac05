"""The planted model: its routing layout, router targets, tokenizer, architecture and scoring helpers.

See :mod:`lm_eval_c3po.demo.planted` for what is planted and why. Layer
indices here count MoE layers (as ``RoutingController`` and the ``layers``
spec do).
"""

from __future__ import annotations

import torch

from lm_eval_c3po.demo import planted_data as pdata
from lm_eval_c3po.routing import RoutingController

NUM_LAYERS = 4
NUM_EXPERTS = 8
TOP_K = 2
CRITICAL_LAYER = NUM_LAYERS - 1  # MoE layer whose last-context-token routing decides the answer
SKILL_EXPERT = [1, 3, 5, 7]  # critical-layer expert that executes skill s
GENERIC_EXPERT = [0, 2, 4, 6]  # critical-layer secondary expert of skill s (contributes no answer)
# lower-layer skill specialisation at the last context token: layer -> expert of skill s
LOWER_SKILL_EXPERT = {0: [0, 2, 4, 6], 1: [6, 4, 2, 0], 2: [2, 7, 4, 1]}

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


# --------------------------------------------------------------------------- router targets


def control_target(skill: int) -> torch.Tensor:
    """Critical-layer router target distribution at the last context token (right routing)."""
    t = torch.full((NUM_EXPERTS,), 0.2 / (NUM_EXPERTS - 2))
    t[SKILL_EXPERT[skill]] = 0.5
    t[GENERIC_EXPERT[skill]] = 0.3
    return t


def perturbed_target(skill: int, planted: bool) -> torch.Tensor:
    """The planted fault: on ``Reply:`` questions the next skill's expert outranks the right one."""
    if not planted:
        return control_target(skill)
    wrong = SKILL_EXPERT[(skill + 1) % len(SKILL_EXPERT)]
    t = torch.full((NUM_EXPERTS,), 0.16 / (NUM_EXPERTS - 3))
    t[wrong] = 0.46
    t[SKILL_EXPERT[skill]] = 0.23
    t[GENERIC_EXPERT[skill]] = 0.15
    return t


def lower_target(layer: int, skill: int) -> torch.Tensor:
    """Router target of a lower MoE layer at the last context token: routed by skill, like a topic expert."""
    t = torch.full((NUM_EXPERTS,), 0.4 / (NUM_EXPERTS - 1))
    t[LOWER_SKILL_EXPERT[layer][skill]] = 0.6
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


def make_model(seed: int, hidden_size: int, intermediate_size: int, num_heads: int, tokenizer):
    """A freshly initialised (seeded) OLMoE of the planted layout with the name head planted."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    mcfg = OlmoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=True,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.0,
        output_router_logits=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = OlmoeForCausalLM(mcfg)
    plant_name_head(model, tokenizer)
    return model


def plant_name_head(model, tokenizer) -> None:
    """Hand-initialise attention head 0 of layer 0 to look up the person's name.

    Every token embedding gets a constant feature and name tokens a "name"
    feature; the head's query reads the constant and its key the name feature in
    the lowest-frequency rotary pair (so the match barely depends on distance).
    The last context token then attends to the name from the start of training,
    which turns minutes of search into seconds. Everything stays trainable.
    """
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    d_one, d_name = cfg.hidden_size - 2, cfg.hidden_size - 1
    slot = hd // 2 - 1  # head-0 row whose rotary partner (slot + hd/2) has the lowest frequency
    name_ids = tokenizer.convert_tokens_to_ids(pdata.NAMES)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, d_one] = 0.05
        emb[:, d_name] = 0.0
        emb[name_ids, d_name] = 0.05
        for proj, src in ((attn.q_proj, d_one), (attn.k_proj, d_name)):
            proj.weight[slot].zero_()
            proj.weight[slot + hd // 2].zero_()
            proj.weight[slot, src] = 1.0
        attn.v_proj.weight[:hd] *= 3.0
        attn.o_proj.weight[:, :hd] *= 3.0


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
