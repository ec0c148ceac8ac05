"""The reference store: correct pathways of a model on reference questions, with k-NN search.

Resolve a store reference (a path, or a Hub dataset ``org/name[@revision]``) with
``resolve_store``, share one with ``push_store``. Write with ``StoreWriter`` (sharded, atomic, resumable), read with
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
    StoreNotFoundError,
)
from lm_eval_c3po.store.hub import push_store, resolve_store
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
    "StoreNotFoundError",
    "StoreWriter",
    "config_fingerprint",
    "lm_signature",
    "model_signature",
    "push_store",
    "resolve_store",
    "tokenizer_fingerprint",
]
