"""Tiny random-weight MoE models and an offline tokenizer, for tests and offline demos.

Nothing here touches the hub: configs are built in code, weights are random
(seeded), and the tokenizer is a byte-level BPE trained on a fixed corpus, so
it encodes any text without unknown tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lm_eval_c3po.routing.families import FAMILIES
from lm_eval_c3po.score import Example

# Toy sizes shared by every family; each family's own knobs are in routing.families.FAMILIES.
_COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    # 10x the usual init scale: at 0.02 a 32-wide random model barely reacts to its routing,
    # which would make every re-mixing test vacuous.
    initializer_range=0.2,
)

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Question: What is the capital of France? Answer: Paris. "
    "Which of these is a mammal? A whale, a shark, a trout or a salmon. The sun rises in the east and sets "
    "in the west. Water boils at one hundred degrees. People use a spoon to eat soup and a knife to cut bread. "
    "She put the book on the shelf because it was heavy. 0 1 2 3 4 5 6 7 8 9 A B C D True False yes no"
)


def make_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a fixed corpus: deterministic and offline."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def make_tiny_model(family: str = "olmoe", seed: int = 0, vocab_size: int = 384, dtype: torch.dtype = torch.float32,
                    **overrides):
    """A random-weight causal LM of ``family`` (a key of :data:`FAMILIES`) in eval mode, built in ``dtype`` (a
    full-size shape in bfloat16 never holds a float32 copy)."""
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; choose from {sorted(FAMILIES)}")
    entry = FAMILIES[family]
    config = getattr(transformers, entry.config_class)(
        **{**_COMMON, **entry.tiny, "vocab_size": vocab_size, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 0,
           **overrides}
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def random_neighbourhoods(contexts: int, neighbours: int = 3, seed: int = 0) -> list[list[Example]]:
    """``neighbours`` random 4-choice examples (20-60 context tokens, answers of 1-5 tokens) per test context,
    for loss calls of realistic shape without a store; ids below 300 fit the offline tokenizer."""
    rng = random.Random(seed)

    def example() -> Example:
        context = [rng.randrange(2, 300) for _ in range(rng.randrange(20, 60))]
        choices = [[rng.randrange(2, 300) for _ in range(rng.randrange(1, 6))] for _ in range(4)]
        return Example(context, choices, rng.randrange(4))

    return [[example() for _ in range(neighbours)] for _ in range(contexts)]


def save_tiny_model(path: str | Path, family: str = "olmoe", seed: int = 0) -> Path:
    """Save a tiny random ``family`` model and the offline tokenizer to ``path`` (for ``pretrained=path``)."""
    path = Path(path)
    tokenizer = make_tokenizer()
    model = make_tiny_model(family, seed=seed, vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_mc_task(directory: str | Path, name: str, docs: list[dict]) -> Path:
    """A local multiple-choice lm-eval task ``name`` (YAML + JSONL) in ``directory`` (an ``--include_path``).

    ``docs`` are ``{"question", "choices", "answer"}`` dicts; the prompt is
    ``Question: ...\nAnswer:`` and each choice follows after a space.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )
    return directory

