"""Planted-pathway benchmark: a known-answer test that C3PO repairs bad routing end to end.

No pretrained MoE can be downloaded in tests or in the offline demo, so this
module *makes* one whose failure mode is known, and a task on which C3PO's
premise holds by construction.

What is planted
---------------
* **World and task** (:mod:`lm_eval_c3po.demo.planted_data`). 40 people, 16
  cities; every person has four distinct cities, one per *skill* (relation):
  birth, work, study, holiday. A question asks one skill of one person in one of
  six paraphrases per skill (each with several skill-specific words: "born",
  "birthplace", "commutes", "office", "university", "vacation", ...) and ends
  with an answer cue, ``Answer:`` or ``Reply:``. The four choices are the
  person's four cities, so every distractor is "the answer another skill would
  give about the same person". Multiple choice, lm-eval style (context,
  choices, gold index, ``target_delimiter=" "``); every answer is one token.
* **A tiny OLMoE** (``OlmoeForCausalLM``: 4 layers, 8 experts, top-2,
  ``norm_topk_prob=True``, hidden 64; word-level tokenizer) trained here in
  about a minute on one CPU thread. At the **last context token of the last MoE
  layer (MoE layer 3, the critical layer)** skill ``s`` is executed by expert
  ``SKILL_EXPERT[s]``: during training the routing of that one token is forced
  to random expert pairs and the answer target is the *forced* experts' cities
  for the person (a soft mixture, sharper for the heavier expert), independent of
  what the question asks. So expert ``SKILL_EXPERT[s]`` computes "the city of
  skill s of the person named in the context", nothing below layer 3 can know
  the answer, and the model's answer is whatever the layer-3 routing at the last
  context token says. The router of that layer is trained separately (a
  supervised auxiliary loss) to send skill ``s`` to ``SKILL_EXPERT[s]`` (target
  weight 0.5, plus a generic expert at 0.3). Lower MoE layers are also routed by
  skill at the last token (auxiliary targets), like topic-specialised experts,
  and see random routing noise there in training so that their experts are not
  load-bearing for the answer.
* **The perturbed router** (the *planted fault*). A second head for the same
  layer-3 router is trained jointly on the same hidden states, with the same
  target except on questions whose cue is ``Reply:``: there it prefers the *next*
  skill's expert ``SKILL_EXPERT[(s+1) % 4]`` (0.46) over the right one (0.23),
  which stays second (ahead of the skill's generic expert at 0.15). With top-2
  renormalisation the wrong expert gets 2/3 of the mix and the
  model answers the next skill's city. The **perturbed model**
  and the **control model** are the same weights except
  ``model.layers.3.mlp.gate.weight`` (perturbed head vs. control head).

Why it is a fair test of C3PO
-----------------------------
* The reference split and the test split are drawn from the same distribution
  (half ``Answer:``, half ``Reply:``; balanced skills) but about *disjoint
  people* (people 0-19 vs. 20-39), so no neighbour carries the test answer; the
  neighbours' gold answers are other people's cities.
* Nothing tells the method which questions are perturbed. The reference builder
  keeps only correctly answered references (as the paper does); with the
  perturbed model those are exactly the ``Answer:`` ones, whose routing is right.
  The ``Reply:`` references are answered wrongly and drop out on their own.
* The test question's neighbours come from the real sentence embedder
  (all-MiniLM-L6-v2) over the question text; the paraphrases make "same skill"
  the dominant similarity (measured: 100% of the 3 nearest correct references
  of every test question share its skill), while the cue barely moves the
  embedding. The fault keys on a formatting detail, not on meaning, so
  semantically similar successful questions carry the right pathway; this is
  the paper's hypothesis, planted.
* The right expert stays inside the perturbed top-2, so gradient methods (which
  only see the selected experts' weights) can reach the fix; the oracle shows
  the headroom.
* The control model (unperturbed router) answers essentially everything
  correctly; a method must not break it.
* The model is trained on every question of the world (both splits' people):
  what is tested is routing, not generalisation; it "knows" every person's
  cities and only needs the right expert. Layer 0's attention head 0 is
  hand-initialised to attend to the person's name (see ``_plant_name_head``),
  which makes training take about a minute; everything else is learned.

Known limits of the construction (measured, see the report in ``main``)
----------------------------------------------------------------------
* Mode finding moves the pathway among *reference pathways* (no text
  similarity). On the critical layer alone the faulty pathway (wrong expert
  0.46) is nearer the *next* skill's correct pathways than its own skill's, so
  mode finding over layer 3 only cannot repair it. The lower layers are routed
  by skill and agree between ``Answer:`` and ``Reply:``, so with two or more MoE
  layers in the pathway (``last:2``, or the default ``last:5`` = all four) the
  nearest reference pathways are the right skill's. Kernel regression, NGD and
  the oracle work with any of these layer sets.
* A ``Reply:`` question is answered right only by chance if at all (measured 0%),
  so no faulty pathway enters a reference store built from correct answers.

What it does not prove
----------------------
It does not show that real pretrained MoEs have such routing faults, that
their critical layers are the last ones, that real benchmark neighbours share
pathways, or the size of gains on MMLU & co. It is a correctness and plumbing
test of capture -> store -> retrieval -> re-mixing -> scoring with a known
answer, and a sanity check that methods do not hurt a well-routed model.
Accuracies here are properties of the planted construction.

API
---
``build_planted(out_dir, seed=0, n_ref=480, n_test=240, perturbed=True) -> PlantedPaths``
writes ``out_dir/{perturbed,control}`` (model + tokenizer directories loadable
with ``AutoModelForCausalLM`` / ``AutoTokenizer`` offline), ``out_dir/data/
{ref,test}.jsonl`` and ``out_dir/tasks/{planted_ref,planted_test}.yaml`` (lm-eval
``multiple_choice`` over ``dataset_path: json`` with absolute ``data_files``).
It is idempotent: a matching ``out_dir/planted.json`` fingerprint is reused.
``PlantedPaths.model`` is the perturbed model when ``perturbed=True``, else the
control. ``c3po demo`` builds it and measures base, mode finding, kernel
regression, NGD (through ``lm_eval --model c3po``) and the oracle on it.
Pathway-space mode finding needs more than the faulty layer in its pathway
(MoE layers 2 and 3, or the default last 5 = all four): on layer 3 alone the
faulty pathway is nearest the next skill's references.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lm_eval_c3po.demo import planted_data as pdata

FORMAT_VERSION = 1

NUM_LAYERS = 4
NUM_EXPERTS = 8
TOP_K = 2
CRITICAL_LAYER = NUM_LAYERS - 1  # MoE layer index whose last-context-token routing decides the answer
# layers to re-mix in the demo (`last:2`): the planted layer plus one skill-routed layer below it, so that
# pathway-space methods (mode finding) see the skill; kernel regression / NGD / oracle work with [3] alone too
RECOMMENDED_LAYERS = [NUM_LAYERS - 2, NUM_LAYERS - 1]
SKILL_EXPERT = [1, 3, 5, 7]  # layer-3 expert that executes skill s
GENERIC_EXPERT = [0, 2, 4, 6]  # layer-3 secondary expert of skill s (contributes no answer)
# lower-layer skill specialisation at the last context token: layer -> expert of skill s
LOWER_SKILL_EXPERT = {0: [0, 2, 4, 6], 1: [6, 4, 2, 0], 2: [2, 7, 4, 1]}

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


@dataclass
class PlantedConfig:
    seed: int = 0
    n_ref: int = 480
    n_test: int = 240
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    steps: int = 600
    batch_size: int = 64
    lr: float = 5e-3
    sharpen: float = 8.0  # answer target of a two-skill-expert mix: p ~ w ** sharpen
    noise_prob: float = 0.15  # per lower layer, chance of random routing at the last token in training
    aux_weight: float = 1.0
    threads: int = 1

    def fingerprint(self) -> str:
        """Config + everything that defines the planted world (bump FORMAT_VERSION on training changes)."""
        planted = {
            "names": pdata.NAMES, "cities": pdata.CITIES, "skills": pdata.SKILLS,
            "templates": pdata.TEMPLATES, "cues": pdata.CUES,
            "skill_expert": SKILL_EXPERT, "generic_expert": GENERIC_EXPERT,
            "lower_skill_expert": {str(k): v for k, v in LOWER_SKILL_EXPERT.items()},
            "targets": [
                [control_target(s).tolist(), perturbed_target(s, True).tolist()]
                + [lower_target(layer, s).tolist() for layer in LOWER_SKILL_EXPERT]
                for s in range(len(SKILL_EXPERT))
            ],
        }
        payload = json.dumps({"format": FORMAT_VERSION, "planted": planted, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class PlantedPaths:
    root: Path
    model: Path  # the model the caller asked for (perturbed or control)
    perturbed_model: Path
    control_model: Path
    ref_jsonl: Path
    test_jsonl: Path
    task_dir: Path  # --include_path for lm_eval: tasks planted_ref and planted_test
    manifest: Path
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- targets


def control_target(skill: int) -> torch.Tensor:
    """Layer-3 router target distribution at the last context token (right routing)."""
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
    t = torch.full((NUM_EXPERTS,), 0.4 / (NUM_EXPERTS - 1))
    t[LOWER_SKILL_EXPERT[layer][skill]] = 0.6
    return t


# --------------------------------------------------------------------------- tokenizer / model


def make_tokenizer():
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


def make_model(cfg: PlantedConfig, vocab_size: int, tokenizer):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    mcfg = OlmoeConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
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
    torch.manual_seed(cfg.seed)
    model = OlmoeForCausalLM(mcfg)
    _plant_name_head(model, tokenizer)
    return model


def _plant_name_head(model, tokenizer) -> None:
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


def gates(model):
    return [layer.mlp.gate for layer in model.model.layers]


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


# --------------------------------------------------------------------------- training


class _RouteForcer:
    """Forward hooks on every router: record inputs/logits, force (weights, index) at given flat rows."""

    def __init__(self, model):
        self.gates = gates(model)
        self.inputs: dict[int, torch.Tensor] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.force: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.handles = [g.register_forward_hook(self._make(i)) for i, g in enumerate(self.gates)]

    def _make(self, layer: int):
        def hook(module, args, output):
            logits, weights, index = output
            self.inputs[layer] = args[0]
            self.logits[layer] = logits
            if layer in self.force:
                rows, w, idx = self.force[layer]
                weights = weights.index_put((rows,), w.to(weights.dtype))
                index = index.index_put((rows,), idx.to(index.dtype))
            return logits, weights, index

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _random_pairs(gen: torch.Generator, n: int, first_pool: list[int] | None = None):
    """n random top-2 expert pairs (distinct) with random weights summing to 1."""
    if first_pool is None:
        first = torch.randint(0, NUM_EXPERTS, (n,), generator=gen)
    else:
        first = torch.tensor(first_pool)[torch.randint(0, len(first_pool), (n,), generator=gen)]
    offset = torch.randint(1, NUM_EXPERTS, (n,), generator=gen)
    second = (first + offset) % NUM_EXPERTS
    w = torch.rand(n, generator=gen) * 0.9 + 0.05
    return torch.stack([first, second], 1), torch.stack([w, 1 - w], 1)


def train(cfg: PlantedConfig, model, tokenizer, world: pdata.World, log=print) -> dict:
    """Train the planted model in place; returns the perturbed layer-3 router weight and stats."""
    docs = pdata.all_instances(world, cfg.seed, pdata.NAMES)
    ids, mask, last, _ = encode_docs(tokenizer, docs)
    skill = torch.tensor([d["skill_index"] for d in docs])
    planted = torch.tensor([d["planted"] for d in docs])
    # city token of every skill of the person asked about: [N, 4]
    city_tok = torch.tensor(
        [
            [tokenizer.convert_tokens_to_ids(world.cities[d["person"]][s]) for s in pdata.SKILLS]
            for d in docs
        ]
    )
    expert_skill = torch.full((NUM_EXPERTS,), -1, dtype=torch.long)
    for s, e in enumerate(SKILL_EXPERT):
        expert_skill[e] = s
    t_ctrl = torch.stack([control_target(int(s)) for s in skill])
    t_pert = torch.stack([perturbed_target(int(s), bool(p)) for s, p in zip(skill, planted)])
    t_low = {l: torch.stack([lower_target(l, int(s)) for s in skill]) for l in LOWER_SKILL_EXPERT}

    gate3 = gates(model)[CRITICAL_LAYER]
    w_pert = torch.nn.Parameter(gate3.weight.detach().clone())
    params = list(model.parameters()) + [w_pert]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    )
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    forcer = _RouteForcer(model)
    model.train()
    t0 = time.time()
    stats = {}
    try:
        for step in range(cfg.steps):
            b = torch.randint(0, len(docs), (cfg.batch_size,), generator=gen)
            width = int(mask[b].sum(1).max())
            bid, bmask, blast = ids[b, :width], mask[b, :width], last[b]
            rows = torch.arange(len(b)) * width + blast
            forcer.force = {}
            noisy = torch.zeros(len(b), dtype=torch.bool)
            for layer in LOWER_SKILL_EXPERT:
                sel = torch.rand(len(b), generator=gen) < cfg.noise_prob
                if sel.any():
                    idx, w = _random_pairs(gen, int(sel.sum()))
                    forcer.force[layer] = (rows[sel], w, idx)
                    noisy |= sel
            # the answer is whatever the forced layer-3 routing says: pair of experts, first one a skill expert
            idx3, w3 = _random_pairs(gen, len(b), SKILL_EXPERT)
            forcer.force[CRITICAL_LAYER] = (rows, w3, idx3)
            out = model(input_ids=bid, attention_mask=bmask)
            logits = out.logits[torch.arange(len(b)), blast]  # [B, V]
            target = torch.zeros_like(logits)
            sk = expert_skill[idx3]  # [B, 2] skill of each forced expert or -1
            mass = torch.where(sk >= 0, w3.pow(cfg.sharpen), torch.zeros_like(w3))
            mass = mass / mass.sum(1, keepdim=True)
            for k in range(2):
                ok = sk[:, k] >= 0
                cols = city_tok[b][torch.arange(len(b)), sk[:, k].clamp(min=0)]
                target[ok.nonzero().squeeze(1), cols[ok]] += mass[ok, k]
            lm_loss = -(target * logits.log_softmax(-1)).sum(-1).mean()
            # router supervision at the last context token
            h3 = forcer.inputs[CRITICAL_LAYER].reshape(-1, cfg.hidden_size)[rows]
            clean = ~noisy
            aux = 0.0
            if clean.any():
                lc = F.linear(h3[clean], gate3.weight).log_softmax(-1)
                lp = F.linear(h3[clean], w_pert).log_softmax(-1)
                aux = aux - (t_ctrl[b][clean] * lc).sum(-1).mean() - (t_pert[b][clean] * lp).sum(-1).mean()
            for layer in LOWER_SKILL_EXPERT:
                ll = forcer.logits[layer].reshape(-1, NUM_EXPERTS)[rows].log_softmax(-1)
                aux = aux - (t_low[layer][b] * ll).sum(-1).mean()
            # elsewhere the perturbed head copies the control head
            h_all = forcer.inputs[CRITICAL_LAYER].reshape(-1, cfg.hidden_size)
            other = bmask.reshape(-1).bool().clone()
            other[rows] = False
            lc_o = F.linear(h_all[other], gate3.weight).detach().log_softmax(-1)
            lp_o = F.linear(h_all[other], w_pert).log_softmax(-1)
            aux = aux + F.kl_div(lp_o, lc_o, log_target=True, reduction="batchmean")
            loss = lm_loss + cfg.aux_weight * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if step % 250 == 0 or step == cfg.steps - 1:
                log(f"[planted] step {step:5d}  lm {lm_loss.item():.4f}  aux {float(aux.detach() if torch.is_tensor(aux) else aux):.4f}  {time.time() - t0:.1f}s")
        stats["train_seconds"] = round(time.time() - t0, 1)
        stats["final_lm_loss"] = round(lm_loss.item(), 5)
    finally:
        forcer.remove()
    model.eval()
    return {"w_pert": w_pert.detach().clone(), **stats}


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
    from lm_eval_c3po.routing import RoutingController

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


# --------------------------------------------------------------------------- export


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps(d, sort_keys=True) + "\n")


def _task_yaml(name: str, data_file: Path) -> str:
    return (
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data_file))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        'target_delimiter: " "\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


def _write_task_yamls(paths: PlantedPaths) -> None:
    paths.task_dir.mkdir(parents=True, exist_ok=True)
    for name, data in (("planted_ref", paths.ref_jsonl), ("planted_test", paths.test_jsonl)):
        target = paths.task_dir / f"{name}.yaml"
        text = _task_yaml(name, data)
        if not target.exists() or target.read_text() != text:
            target.write_text(text)


def _save_model_dir(model, tokenizer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def build_planted(
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_ref: int = 480,
    n_test: int = 240,
    perturbed: bool = True,
    log=print,
    **overrides,
) -> PlantedPaths:
    """Generate (or reuse) the planted benchmark under ``out_dir``; see the module docstring."""
    cfg = PlantedConfig(seed=seed, n_ref=n_ref, n_test=n_test, **overrides)
    root = Path(out_dir).resolve()
    paths = PlantedPaths(
        root=root,
        model=root / ("perturbed" if perturbed else "control"),
        perturbed_model=root / "perturbed",
        control_model=root / "control",
        ref_jsonl=root / "data" / "ref.jsonl",
        test_jsonl=root / "data" / "test.jsonl",
        task_dir=root / "tasks",
        manifest=root / "planted.json",
    )
    fp = cfg.fingerprint()
    if paths.manifest.exists():
        info = json.loads(paths.manifest.read_text())
        needed = [paths.perturbed_model / "config.json", paths.control_model / "config.json",
                  paths.ref_jsonl, paths.test_jsonl, paths.task_dir / "planted_test.yaml"]
        if info.get("fingerprint") == fp and all(p.exists() for p in needed):
            _write_task_yamls(paths)  # the directory may have moved: refresh the absolute data paths
            paths.info = info
            return paths

    for sub in ("perturbed", "control", "data", "tasks"):
        shutil.rmtree(root / sub, ignore_errors=True)
    if paths.manifest.exists():
        paths.manifest.unlink()
    root.mkdir(parents=True, exist_ok=True)

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        random.seed(seed)
        world = pdata.make_world(seed)
        ref, test = pdata.make_splits(world, seed, n_ref, n_test)
        tokenizer = make_tokenizer()
        model = make_model(cfg, len(tokenizer), tokenizer)
        t0 = time.time()
        result = train(cfg, model, tokenizer, world, log=log)

        (root / "data").mkdir(parents=True, exist_ok=True)
        _write_jsonl(paths.ref_jsonl, ref)
        _write_jsonl(paths.test_jsonl, test)
        _write_task_yamls(paths)

        _save_model_dir(model, tokenizer, paths.control_model)
        gate3 = gates(model)[CRITICAL_LAYER]
        with torch.no_grad():
            gate3.weight.copy_(result["w_pert"])
        _save_model_dir(model, tokenizer, paths.perturbed_model)

        info = {
            "format": FORMAT_VERSION,
            "fingerprint": fp,
            "config": asdict(cfg),
            "critical_moe_layer": CRITICAL_LAYER,
            "skill_expert": SKILL_EXPERT,
            "skills": pdata.SKILLS,
            "cues": {"clean": pdata.CUE_CLEAN, "planted": pdata.CUE_PLANTED},
            "train_seconds": result["train_seconds"],
            "final_lm_loss": result["final_lm_loss"],
            "build_seconds": round(time.time() - t0, 1),
        }
        paths.manifest.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        paths.info = info
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
    return paths


def load_split(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> None:
    """``python -m lm_eval_c3po.demo.planted OUT_DIR [--seed N]``: build (or reuse) the benchmark only.

    ``c3po demo`` builds it and measures every method through lm-eval.
    """
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.time()
    paths = build_planted(args.out_dir, seed=args.seed)
    print(f"[planted] built/reused {paths.root} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
