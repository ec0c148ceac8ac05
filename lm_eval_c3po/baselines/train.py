"""Prefix tuning and soft prompt (prompt tuning) with PEFT, trained on reference docs, the base model frozen.

The paper (Section 4.1) compares C3PO against both, "trained on the full
reference sets while keeping the base model frozen", and gives no
hyper-parameters. Each reference doc contributes one example: the gold
choice's (context, continuation) as lm-eval builds the request, tokenised by
lm-eval's own ``_encode_pair``, so the adapter is trained on exactly the
strings and tokens that ``lm_eval --model hf`` later scores. The loss is the
negative log-likelihood of the continuation tokens given the context (context
tokens carry no label), averaged over continuation tokens.

Everything random (prompt initialisation, shuffling) draws from ``seed``, so
the same seed gives the same adapter weights (bit-identical on CPU). The
adapter is written to a temp directory next to ``out`` and swapped in only
when complete, so a killed run never leaves half an adapter at ``out``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lm_eval_c3po.store._fs import fsync_dir, swap_in
from lm_eval_c3po.store.crash_points import crash_point

METHODS = ("prefix", "prompt")
# Not given by the paper; ours. Prompt tuning: PEFT's prompt-tuning example rate for AdamW (Lester et al.
# used 0.3 with Adafactor). Prefix tuning without the reparametrisation MLP: PEFT's prefix-tuning example rate.
DEFAULT_LR = {"prefix": 1e-2, "prompt": 3e-2}
DEFAULT_VIRTUAL_TOKENS = 20  # ours; Lester et al. report 20-100 soft tokens, Li & Liang 10-200 prefix tokens
DEFAULT_EPOCHS = 2  # ours
DEFAULT_BATCH_SIZE = 8  # ours
DEFAULT_SEED = 1234
INFO_FILE = "c3po_baseline.json"
# The temp directory of a run: ``.<out name>.train-tmp-<pid>``, next to ``out``.
_TMP_MARK = ".train-tmp-"


class TrainError(Exception):
    """A training request that cannot be carried out; the CLI prints it and exits 1."""


@dataclass(frozen=True)
class TrainSettings:
    """What was trained and how; recorded in the adapter's ``c3po_baseline.json``."""

    method: str
    num_virtual_tokens: int = DEFAULT_VIRTUAL_TOKENS
    lr: float | None = None  # None: DEFAULT_LR[method]
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TrainError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("num_virtual_tokens", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise TrainError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[self.method])
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainError(f"--lr must be a positive number, got {self.lr}")


@dataclass(frozen=True)
class Example:
    """One training example: token ids of the context and of the gold continuation."""

    id: str
    context: tuple[int, ...]
    continuation: tuple[int, ...]


def examples_from_docs(lm, docs: Sequence, max_length: int) -> list[Example]:
    """One example per doc, from its gold request, tokenised as lm-eval tokenises it.

    ``lm`` is an lm-eval ``HFLM`` (its ``_encode_pair`` moves the context's
    trailing spaces to the continuation and splits one encoding of the whole
    string); ``docs`` are :class:`reference_builders.tasks.DocRequests`. Too
    long examples keep their last ``max_length`` tokens, as lm-eval truncates
    contexts from the left; at least one context token always stays.
    """
    if max_length < 2:
        raise TrainError(f"max_length must be >= 2 (one context and one continuation token), got {max_length}")
    out = []
    for doc in docs:
        context, continuation = doc.arguments[doc.gold]
        if context:
            ctx, cont = lm._encode_pair(context, continuation)
        else:  # lm-eval scores an empty context after the prefix (BOS/EOS) token
            ctx, cont = [lm.prefix_token_id], lm.tok_encode(continuation, add_special_tokens=False)
        if not cont:
            continue
        cont = cont[-(max_length - 1):]
        ctx = ctx[-(max_length - len(cont)):]
        out.append(Example(doc.id, tuple(int(t) for t in ctx), tuple(int(t) for t in cont)))
    return out


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on context and padding)."""
    width = max(len(e.context) + len(e.continuation) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        tokens = torch.tensor(e.context + e.continuation, dtype=torch.long)
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
        labels[row, len(e.context) : len(tokens)] = tokens[len(e.context) :]
    return ids, mask, labels


def make_peft_model(model, settings: TrainSettings):
    """``model`` wrapped in a fresh prefix-tuning or prompt-tuning PEFT adapter, initialised from ``settings.seed``.

    Prompt tuning starts from embeddings of tokens sampled from the vocabulary
    (Lester et al. found this better than random vectors); prefix tuning from
    PEFT's default init, without the reparametrisation MLP (the saved adapter
    is then exactly what is trained). PEFT freezes every base-model parameter.
    """
    from peft import PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    torch.manual_seed(settings.seed)
    if settings.method == "prompt":
        config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=settings.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
        )
    else:
        config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=settings.num_virtual_tokens)
    peft_model = get_peft_model(model, config)
    device = model.get_input_embeddings().weight.device
    peft_model.prompt_encoder.to(device)
    return peft_model


def _nll(peft_model, batch: tuple[torch.Tensor, ...], device) -> tuple[torch.Tensor, int]:
    """Summed NLL of the labelled tokens of ``batch`` and their count."""
    ids, mask, labels = (t.to(device) for t in batch)
    logits = peft_model(input_ids=ids, attention_mask=mask).logits
    logits = logits[:, -ids.shape[1]:]  # prompt tuning prepends its virtual tokens' positions
    targets = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
        reduction="sum",
    )
    return loss, int((targets != -100).sum())


def _batches(examples: Sequence[Example], order: Sequence[int], batch_size: int, pad_id: int):
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)


def check_forward(peft_model, examples: Sequence[Example], settings: TrainSettings, *, pad_id: int) -> None:
    """Run one example through the adapted model; a model whose cache PEFT cannot prefix is refused clearly.

    PEFT's prefix tuning hands the model a ready key/value cache of
    ``num_virtual_tokens`` per layer in the standard ``[batch, kv_heads, tokens,
    head_dim]`` layout. Models whose attention caches something else (DeepSeek-V2/V3's
    multi-head latent attention caches a compressed latent and a shared rope key)
    fail inside their attention with a shape error.
    """
    device = peft_model.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            _nll(peft_model, collate(examples[:1], pad_id), device)
    except RuntimeError as err:
        if settings.method != "prefix":
            raise
        model_type = getattr(peft_model.base_model.config, "model_type", "?")
        raise TrainError(
            f"prefix tuning does not run on this model ({model_type}): PEFT's key/value prefix does not fit its "
            f"attention cache ({str(err).splitlines()[0]}). Train the soft prompt instead: --method prompt"
        ) from None


@torch.no_grad()
def reference_loss(peft_model, examples: Sequence[Example], *, pad_id: int, batch_size: int = 8,
                   device=None) -> float:
    """Mean NLL per continuation token over ``examples`` (the training objective, without gradients)."""
    device = device or peft_model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    for batch in _batches(examples, range(len(examples)), batch_size, pad_id):
        loss, n = _nll(peft_model, batch, device)
        total, count = total + float(loss), count + n
    return total / max(count, 1)


def train_adapter(peft_model, examples: Sequence[Example], settings: TrainSettings, *, pad_id: int,
                  progress: bool = True) -> list[float]:
    """Train the adapter's parameters in place; returns the mean training loss per epoch.

    AdamW, learning rate decaying linearly from ``settings.lr`` to 0 over all
    steps, examples shuffled every epoch by a generator seeded with
    ``settings.seed``. The base model stays in eval mode (no dropout) and frozen.
    """
    from tqdm.auto import tqdm

    if not examples:
        raise TrainError("no training examples: the reference tasks gave no docs with a gold continuation")
    frozen = [n for n, p in peft_model.base_model.named_parameters() if p.requires_grad]
    if frozen:
        raise TrainError(f"base-model parameters are trainable ({frozen[:3]} ...); the baseline keeps them frozen")
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr)
    steps_per_epoch = math.ceil(len(examples) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total_steps)
    generator = torch.Generator().manual_seed(settings.seed)
    device = peft_model.get_input_embeddings().weight.device
    peft_model.eval()  # dropout off: the base model is evaluated as lm-eval evaluates it
    epoch_losses = []
    bar = tqdm(total=total_steps, desc=f"{settings.method} tuning", disable=not progress)
    for epoch in range(settings.epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        total, count = 0.0, 0
        for batch in _batches(examples, order, settings.batch_size, pad_id):
            loss_sum, n = _nll(peft_model, batch, device)
            optimizer.zero_grad(set_to_none=True)
            (loss_sum / max(n, 1)).backward()
            optimizer.step()
            schedule.step()
            total, count = total + float(loss_sum.detach()), count + n
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{total / max(count, 1):.4f}")
        epoch_losses.append(total / max(count, 1))
    bar.close()
    return epoch_losses


# -- saving -------------------------------------------------------------------


def stale_temp_dirs(out: Path) -> list[Path]:
    """Temp directories of earlier runs on ``out`` whose process is gone (killed runs leave them)."""
    found = []
    for path in sorted(out.parent.glob(f".{out.name}{_TMP_MARK}*")):
        pid = path.name.rsplit(_TMP_MARK, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        found.append(path)
    old = out.with_name(out.name + ".old")  # swap_in's fallback leaves this if killed between its renames
    return found + ([old] if old.exists() else [])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Delete what killed runs on ``out`` left behind; returns the paths removed."""
    stale = stale_temp_dirs(out)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def save_adapter(peft_model, out: Path, info: dict[str, Any]) -> Path:
    """Write the adapter (PEFT's ``save_pretrained`` files + ``c3po_baseline.json``) to ``out`` atomically.

    Files go to ``.<out>.train-tmp-<pid>`` beside ``out``, are fsynced, and the
    directory is swapped in as a whole (``swap_in``: rename, or an atomic
    exchange with an existing ``out``), so ``out`` is always absent, the old
    adapter, or the complete new one.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}{_TMP_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    crash_point("writing the adapter files")
    peft_model.save_pretrained(str(tmp))
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=False, default=str) + "\n")
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(tmp)
    crash_point(f"swapping {tmp.name} into {out.name}")
    swap_in(tmp, out)
    return out


def run_info(settings: TrainSettings, **extra: Any) -> dict[str, Any]:
    """The ``c3po_baseline.json`` record: settings, versions, time, and whatever the caller adds."""
    import lm_eval
    import peft

    return {
        "baseline": {"prefix": "prefix tuning", "prompt": "soft prompt (prompt tuning)"}[settings.method],
        "settings": asdict(settings),
        **extra,
        "versions": {"peft": peft.__version__, "lm_eval": lm_eval.__version__, "torch": torch.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
