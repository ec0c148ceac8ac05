"""Who a store belongs to: the model and embedder signatures, and their fingerprints.

A store's pathways are only meaningful for the exact model that produced them
(same weights, same router shapes, same tokenisation of the contexts) and its
embeddings only for the exact embedder. These small frozen dataclasses are
what ``ReferenceStore.load`` compares, field by field, so a mismatch can be
refused with a message that names both sides.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

ROUTING_KINDS = ("softmax", "sigmoid")

# Config keys that change between saves/loads of the same checkpoint, or that are
# runtime switches with no effect on routing; they must not change the fingerprint.
VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "_commit_hash",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "architectures",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "attn_implementation",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "output_router_logits",
        "return_dict",
    }
)

# Strings whose default encoding (special tokens included) pins down normalisation,
# pre-tokenisation and BOS/EOS handling, which the vocabulary alone does not.
TOKENIZER_PROBES = (
    "Question: What is 12 + 30?\nAnswer:",
    " The quick brown fox jumps over the lazy dog.",
    "naïve café, 東京, emoji 🙂 and   spaces\t\ttabs",
)


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _strip_volatile(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _strip_volatile(v) for k, v in obj.items() if k not in VOLATILE_CONFIG_KEYS}
    if isinstance(obj, (list, tuple)):
        return [_strip_volatile(v) for v in obj]
    return obj


def config_fingerprint(config: Mapping[str, Any] | Any) -> str:
    """Stable 16-hex hash of a model config (a dict, or anything with ``to_dict()``).

    In: every config field, recursively (sub-configs too), canonical JSON with
    sorted keys. Out: the keys in ``VOLATILE_CONFIG_KEYS`` (load path, library
    version, dtype, attention backend, output switches), which differ between two
    loads of the same checkpoint without changing its routing.
    """
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return _digest(_strip_volatile(config_dict))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Stable 16-hex hash of what a tokenizer turns text into.

    In: the full vocabulary (``get_vocab()``), the bos/eos/unk/pad/sep/cls token
    ids, and the default ``encode`` (special tokens included) of a few fixed
    probe strings. Out: the class name (slow and fast tokenizers of one model
    agree), padding side, max length and the load path.
    """
    special = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad", "sep", "cls")
    }
    probes = [list(map(int, tokenizer.encode(text))) for text in TOKENIZER_PROBES]
    vocab = sorted((str(tok), int(i)) for tok, i in tokenizer.get_vocab().items())
    return _digest({"vocab": vocab, "special": special, "probes": probes})


@dataclass(frozen=True)
class ModelSignature:
    """The identity of the model a store was built for; all fields must match at load.

    ``num_layers`` counts MoE layers only, ``moe_layers`` are their indices among
    all decoder layers, ``routing_kind`` is how the router turns logits into scores.
    """

    model_id: str
    revision: str
    config_fingerprint: str
    tokenizer_fingerprint: str
    num_layers: int
    num_experts: int
    top_k: int
    routing_kind: str
    moe_layers: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "moe_layers", tuple(int(i) for i in self.moe_layers))
        if self.routing_kind not in ROUTING_KINDS:
            raise ValueError(f"routing_kind must be one of {ROUTING_KINDS}, got {self.routing_kind!r}")
        if len(self.moe_layers) != self.num_layers:
            raise ValueError(
                f"moe_layers lists {len(self.moe_layers)} layers but num_layers is {self.num_layers}"
            )
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..num_experts={self.num_experts}, got {self.top_k}")

    def describe(self) -> str:
        return (
            f"{self.model_id}@{self.revision} ({self.num_layers}x{self.num_experts}, top-{self.top_k} "
            f"{self.routing_kind}, config {self.config_fingerprint}, tokenizer {self.tokenizer_fingerprint})"
        )

    def differences(self, other: ModelSignature) -> list[str]:
        """Names of the fields where ``other`` differs from this signature."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSignature:
        return cls(**{f.name: d[f.name] for f in fields(cls)})


# EmbedderSignature fields that change the vectors (compared at load) and those recorded only for people.
_EMBEDDER_IDENTITY = ("name", "dim", "query_prompt", "document_prompt", "append_eos")


@dataclass(frozen=True)
class EmbedderSignature:
    """The sentence embedder whose vectors are in the store, and how it was prompted.

    ``query_prompt`` / ``document_prompt`` are the literal texts prepended to
    test questions / reference questions ("" for none), ``append_eos`` whether
    the tokenizer's EOS was appended. Together with the name and dimension
    these decide the vectors, so all of them must match at load. ``dtype`` and
    ``max_seq_length`` are recorded for people (``c3po inspect``) but not
    compared: a store embedded in float32 is still searched correctly with
    bfloat16 queries.
    """

    name: str
    dim: int
    query_prompt: str = ""
    document_prompt: str = ""
    append_eos: bool = False
    dtype: str | None = field(default=None, compare=False)
    max_seq_length: int | None = field(default=None, compare=False)

    def describe(self) -> str:
        parts = [f"{self.dim}-d"]
        for side in ("query", "document"):
            prompt = getattr(self, f"{side}_prompt")
            if prompt:
                parts.append(f"{side} prompt {prompt!r}")
        if self.append_eos:
            parts.append("EOS appended")
        return f"{self.name} ({', '.join(parts)})"

    def differences(self, other: EmbedderSignature) -> list[str]:
        """Names of the fields that decide the vectors where ``other`` differs from this signature."""
        return [name for name in _EMBEDDER_IDENTITY if getattr(self, name) != getattr(other, name)]

    def to_dict(self) -> dict[str, Any]:
        """Name and dim always; the other fields only when set, so a plain embedder's manifest stays as before."""
        d = asdict(self)
        return {k: v for k, v in d.items() if k in ("name", "dim") or v not in (None, "", False)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EmbedderSignature:
        max_seq_length = d.get("max_seq_length")
        return cls(
            name=str(d["name"]),
            dim=int(d["dim"]),
            query_prompt=str(d.get("query_prompt", "")),
            document_prompt=str(d.get("document_prompt", "")),
            append_eos=bool(d.get("append_eos", False)),
            dtype=None if d.get("dtype") is None else str(d["dtype"]),
            max_seq_length=None if max_seq_length is None else int(max_seq_length),
        )
