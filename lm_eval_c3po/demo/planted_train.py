"""Training the planted model: forced critical routing, router supervision, the faulty router head.

The routing of the last context token is forced through
:meth:`RoutingController.override` (the same code path the re-mixing methods
use): forcing an expert pair with weights ``(w, 1 - w)`` is an override with
omega equal to those weights on the pair and 0 elsewhere, which the family's
rule (top-2, renormalised) turns back into exactly that pair and those weights.
The answer target is computed from what that rule returned, so it is the
mixture the experts actually ran with. Router inputs and logits for the
auxiliary losses are read by a small forward hook on each router
(:func:`router_io`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from lm_eval_c3po.demo import planted_data as pdata
from lm_eval_c3po.demo import planted_model as pm
from lm_eval_c3po.routing import FAMILIES, RoutingController

FORMAT_VERSION = 2  # 2: training forces routing through RoutingController.override


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
    family: str = "olmoe"  # a key of lm_eval_c3po.routing.FAMILIES
    critical_layer: int = pm.CRITICAL_LAYER  # MoE layer whose routing at the critical token decides the answer
    token_offset: int = 0  # the critical token: the last context token minus this many positions
    fault: str | None = None  # "inside" / "outside" (see planted_model.perturbed_target); None: the family's default
    decoys: int = 0  # retrieval noise: paraphrases per skill that ask another skill (planted_data.routed_skill)

    @property
    def fault_kind(self) -> str:
        return self.fault or pm.DEFAULT_FAULT.get(self.family, "inside")

    def validate(self) -> None:
        if not 0 <= self.critical_layer < pm.NUM_LAYERS:
            raise ValueError(f"critical_layer {self.critical_layer} outside the {pm.NUM_LAYERS} MoE layers")
        if self.token_offset and self.critical_layer == pm.NUM_LAYERS - 1:
            raise ValueError("a critical token before the last needs a critical layer below the last "
                             "(the last layer's output at an earlier token never reaches the answer)")
        n_templates = min(len(t) for t in pdata.TEMPLATES.values())
        if not 0 <= self.decoys < n_templates:
            raise ValueError(f"decoys={self.decoys}: use 0..{n_templates - 1} of the {n_templates} paraphrases per skill")
        if self.fault_kind not in pm.FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; choose from {pm.FAULTS}")

    def fingerprint(self) -> str:
        """Config + everything that defines the planted world (bump FORMAT_VERSION on training changes)."""
        planted = {
            "names": pdata.NAMES, "cities": pdata.CITIES, "skills": pdata.SKILLS,
            "templates": pdata.TEMPLATES, "cues": pdata.CUES,
            "skill_expert": pm.SKILL_EXPERT, "generic_expert": pm.GENERIC_EXPERT,
            "other_skill_expert": {str(k): v for k, v in pm.other_layers(self.critical_layer).items()},
            "targets": [
                [pm.control_target(s).tolist(), pm.perturbed_target(s, True, self.fault_kind).tolist()]
                + [pm.other_target(e, s).tolist() for e in pm.other_layers(self.critical_layer).values()]
                for s in range(len(pm.SKILL_EXPERT))
            ],
        }
        if FAMILIES[self.family].rule.kind == "sigmoid":
            planted["router_loss"] = "per-expert BCE, mean over experts"  # format 2 summed them (no answers learnt)
        payload = json.dumps({"format": FORMAT_VERSION, "planted": planted, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class RouterIO:
    """Router input ``[B*T, H]`` and logits ``[B*T, E]`` of each MoE layer in the last forward pass."""

    inputs: dict[int, torch.Tensor]
    logits: dict[int, torch.Tensor]


@contextmanager
def router_io(ctl: RoutingController) -> Iterator[RouterIO]:
    """Record every router's input and logits (with their graph) while the block runs."""
    io = RouterIO({}, {})

    def make(layer: int):
        def hook(module, args, output):
            io.inputs[layer] = args[0].reshape(-1, args[0].shape[-1])
            io.logits[layer] = output[0].reshape(-1, output[0].shape[-1])

        return hook

    handles = [moe.router.register_forward_hook(make(moe.index)) for moe in ctl.layers]
    try:
        yield io
    finally:
        for handle in handles:
            handle.remove()


def random_pairs(gen: torch.Generator, n: int, first_pool: list[int] | None = None):
    """n random top-2 expert pairs (distinct) with random weights summing to 1."""
    if first_pool is None:
        first = torch.randint(0, pm.NUM_EXPERTS, (n,), generator=gen)
    else:
        first = torch.tensor(first_pool)[torch.randint(0, len(first_pool), (n,), generator=gen)]
    offset = torch.randint(1, pm.NUM_EXPERTS, (n,), generator=gen)
    second = (first + offset) % pm.NUM_EXPERTS
    w = torch.rand(n, generator=gen) * 0.9 + 0.05
    return torch.stack([first, second], 1), torch.stack([w, 1 - w], 1)


def pair_omega(index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Pathway rows ``[n, E]`` with ``weights`` on the experts ``index`` and 0 elsewhere."""
    return torch.zeros(len(index), pm.NUM_EXPERTS).scatter(1, index, weights)


def _force(ctl: RoutingController, layer: int, pos: torch.Tensor, sel: torch.Tensor, omega: torch.Tensor):
    """An override of MoE layer ``layer`` at token ``pos`` of the rows ``sel`` (other rows untouched)."""
    positions = torch.where(sel, pos, torch.full_like(pos, -1)).unsqueeze(1)
    full = torch.zeros(len(pos), 1, 1, pm.NUM_EXPERTS)
    full[sel, 0, 0] = omega
    return ctl.override(positions, full, layers=[layer])


def _router_xent(kind: str, target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of router scores against ``target``: softmax scores as one distribution, sigmoid
    scores (DeepSeek-V3) expert by expert, averaged over experts (summed, the E binary losses outweigh the
    answer loss and the model never learns the answers)."""
    if kind == "sigmoid":
        return F.binary_cross_entropy_with_logits(logits, target)
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def _router_copy(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Loss that makes the ``student`` router logits score like the (detached) ``teacher`` logits."""
    if kind == "sigmoid":
        return F.binary_cross_entropy_with_logits(student, teacher.sigmoid())
    return F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")


def train(cfg: PlantedConfig, model, tokenizer, world: pdata.World, log=print) -> dict:
    """Train the planted model in place; returns the perturbed critical router weight and stats."""
    docs = pdata.all_instances(world, cfg.seed, pdata.NAMES, cfg.decoys)
    ids, mask, last, _ = pm.encode_docs(tokenizer, docs)
    skill = torch.tensor([d["skill_index"] for d in docs])
    planted = torch.tensor([d["planted"] for d in docs])
    # city token of every skill of the person asked about: [N, 4]
    city_tok = torch.tensor(
        [
            [tokenizer.convert_tokens_to_ids(world.cities[d["person"]][s]) for s in pdata.SKILLS]
            for d in docs
        ]
    )
    expert_skill = torch.full((pm.NUM_EXPERTS,), -1, dtype=torch.long)
    for s, e in enumerate(pm.SKILL_EXPERT):
        expert_skill[e] = s
    t_ctrl = torch.stack([pm.control_target(int(s)) for s in skill])
    t_pert = torch.stack([pm.perturbed_target(int(s), bool(p), cfg.fault_kind) for s, p in zip(skill, planted)])
    others = pm.other_layers(cfg.critical_layer)
    t_low = {l: torch.stack([pm.other_target(e, int(s)) for s in skill]) for l, e in others.items()}
    crit_pos = last - cfg.token_offset

    ctl = RoutingController(model)
    critical = ctl.layers[cfg.critical_layer]
    kind = critical.adapter.kind
    gate3 = critical.router
    w_pert = torch.nn.Parameter(gate3.weight.detach().clone())
    params = list(model.parameters()) + [w_pert]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    )
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    model.train()
    for moe in ctl.layers:  # routers route as at inference (PhiMoE's sparsemixer samples in training mode)
        moe.router.eval()
    t0 = time.time()
    for step in range(cfg.steps):
        b = torch.randint(0, len(docs), (cfg.batch_size,), generator=gen)
        width = int(mask[b].sum(1).max())
        bid, bmask, blast, bcrit = ids[b, :width], mask[b, :width], last[b], crit_pos[b]
        rows = torch.arange(len(b)) * width + blast
        crows = torch.arange(len(b)) * width + bcrit
        everyone = torch.ones(len(b), dtype=torch.bool)
        noisy = torch.zeros(len(b), dtype=torch.bool)
        with ExitStack() as stack:
            for layer in others:
                sel = torch.rand(len(b), generator=gen) < cfg.noise_prob
                if sel.any():
                    idx, w = random_pairs(gen, int(sel.sum()))
                    stack.enter_context(_force(ctl, layer, blast, sel, pair_omega(idx, w)))
                    noisy |= sel
            # the answer is whatever the forced critical routing says: pair of experts, first one a skill expert
            idx3, w3 = random_pairs(gen, len(b), pm.SKILL_EXPERT)
            omega3 = pair_omega(idx3, w3)
            stack.enter_context(_force(ctl, cfg.critical_layer, bcrit, everyone, omega3))
            io = stack.enter_context(router_io(ctl))
            out = model(input_ids=bid, attention_mask=bmask)
        # the mixture the experts ran with: the family's rule applied to the forced pathway
        w3, idx3 = critical.adapter.route(gate3, omega3, io.logits[cfg.critical_layer][crows].detach())
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
        # router supervision: the critical router at the critical token, the others at the last context token
        h3 = io.inputs[cfg.critical_layer][crows]
        clean = ~noisy
        aux = torch.zeros(())
        if clean.any():
            aux = aux + _router_xent(kind, t_ctrl[b][clean], F.linear(h3[clean], gate3.weight))
            aux = aux + _router_xent(kind, t_pert[b][clean], F.linear(h3[clean], w_pert))
        for layer in others:
            aux = aux + _router_xent(kind, t_low[layer][b], io.logits[layer][rows])
        # elsewhere the perturbed head copies the control head
        h_all = io.inputs[cfg.critical_layer]
        other = bmask.reshape(-1).bool().clone()
        other[crows] = False
        aux = aux + _router_copy(kind, F.linear(h_all[other], w_pert), F.linear(h_all[other], gate3.weight).detach())
        loss = lm_loss + cfg.aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == cfg.steps - 1:
            log(f"[planted] step {step:5d}  lm {lm_loss.item():.4f}  aux {aux.item():.4f}  {time.time() - t0:.1f}s")
    model.eval()
    return {"w_pert": w_pert.detach().clone(), "train_seconds": round(time.time() - t0, 1),
            "final_lm_loss": round(lm_loss.item(), 5)}
