"""The store's exceptions: one class per thing a user must do differently.

Every message names the offending file or field and the fix, so a CLI can
print ``str(err)`` and stop; callers that want to branch catch the subclass.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every reference-store error."""


class StoreCorruptError(StoreError):
    """A store file is missing, unreadable, or inconsistent with the others."""


class StoreIncompleteError(StoreError):
    """The directory holds a build that never finished (no final manifest)."""


class StoreMismatchError(StoreError):
    """The store was built for another model or with another embedder."""


class StoreExistsError(StoreError):
    """The output directory already holds something a build must not overwrite."""


class StoreLockedError(StoreError):
    """Another live process is writing the same store."""


class EmptyStoreError(StoreError):
    """A build kept no records, so there is no store to write."""


class StoreNotFoundError(StoreError):
    """A store reference names neither a local directory nor a fetchable Hub dataset repo."""
