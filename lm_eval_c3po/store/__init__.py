"""The reference store: correct pathways of a model on reference questions, with k-NN search.

Write with ``StoreWriter`` (sharded, atomic, resumable), read with
``ReferenceStore.load`` (validated against the model and embedder), search
with ``ReferenceStore.knn`` / ``within``. The format is described in the README, "Reference stores".
"""

from lm_eval_c3po.store.errors import (
    EmptyStoreError,
    StoreCorruptError,
    StoreError,
    StoreExistsError,
    StoreIncompleteError,
    StoreLockedError,
    StoreMismatchError,
)
from lm_eval_c3po.store.identity import lm_signature, model_signature
from lm_eval_c3po.store.manifest import FORMAT_VERSION, SourceCounts, StoreManifest
from lm_eval_c3po.store.record import Record
from lm_eval_c3po.store.reference_store import ReferenceStore
from lm_eval_c3po.store.search import DEFAULT_DEDUP
from lm_eval_c3po.store.signature import (
    EmbedderSignature,
    ModelSignature,
    config_fingerprint,
    tokenizer_fingerprint,
)
from lm_eval_c3po.store.writer import KEEP_POLICIES, StoreWriter

__all__ = [
    "DEFAULT_DEDUP",
    "FORMAT_VERSION",
    "KEEP_POLICIES",
    "EmbedderSignature",
    "EmptyStoreError",
    "ModelSignature",
    "Record",
    "ReferenceStore",
    "SourceCounts",
    "StoreCorruptError",
    "StoreError",
    "StoreExistsError",
    "StoreIncompleteError",
    "StoreLockedError",
    "StoreManifest",
    "StoreMismatchError",
    "StoreWriter",
    "config_fingerprint",
    "lm_signature",
    "model_signature",
    "tokenizer_fingerprint",
]
