"""Reference stores shared through the Hugging Face Hub, as dataset repos.

A store reference is a local directory or ``org/name[@revision]``, a Hub *dataset* repo id.
:func:`resolve_store` turns either into a local directory (Hub repos are fetched with
``huggingface_hub.snapshot_download`` into the ordinary HF cache, so ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``, tokens and mirrors behave as for any model or dataset); the caller then
loads it with ``ReferenceStore.load``, which checks every file's SHA-256 against the manifest
and the model and embedder signatures exactly as for a store built on this machine.
:func:`push_store` uploads a finished store (``c3po push-reference``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lm_eval_c3po.store.errors import StoreNotFoundError
from lm_eval_c3po.store.manifest import MANIFEST_FILE, load_manifest
from lm_eval_c3po.store.reference_store import ReferenceStore
from lm_eval_c3po.store.shards import SHARD_DIR, TENSOR_SUFFIX, TEXT_SUFFIX

# ``org/name`` as the Hub allows repo ids (letters, digits, ``-``, ``_``, ``.``), optionally ``@revision``
# (a branch, tag or commit; branch names may contain ``/``).
_HUB_SPEC = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
REPO_TYPE = "dataset"


def parse_hub_spec(spec: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``spec`` reads as ``org/name[@revision]``, else None."""
    match = _HUB_SPEC.fullmatch(spec.strip())
    if match is None or ".." in match["repo"]:
        return None
    return match["repo"], match["revision"]


def resolve_store(spec: str | os.PathLike[str]) -> Path:
    """The local directory of the reference store ``spec`` names: a path, or a Hub dataset repo.

    * A path that exists is used as it is (a local directory wins over a Hub repo of the same
      name, e.g. ``refs/arc``).
    * ``org/name`` or ``org/name@revision`` (branch, tag or commit) is downloaded with
      ``huggingface_hub.snapshot_download(repo_type="dataset")`` into the HF cache (nothing is
      fetched again when the cache holds that revision; with ``HF_HUB_OFFLINE=1`` the cache alone
      is used) and its snapshot directory returned.
    * Anything else raises :class:`StoreNotFoundError` naming both readings and how to fix each.

    The directory is not checked here: load it with ``ReferenceStore.load(path, expect, embedder)``,
    which verifies files and signatures the same way for a downloaded store as for a local one.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = os.fspath(spec)
    hub = parse_hub_spec(text)
    local_reading = f"no reference store at {path.absolute()} (build one with `c3po build-reference --out {text}`)"
    if hub is None:
        raise StoreNotFoundError(
            f"{text!r}: {local_reading}, and it is not a Hugging Face Hub dataset repo id either "
            "(org/name or org/name@revision)"
        )
    repo_id, revision = hub
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo_id, repo_type=REPO_TYPE, revision=revision))
    except Exception as err:  # noqa: BLE001  (offline, 404, gated, auth: all mean "not this reading")
        at = f"@{revision}" if revision else ""
        raise StoreNotFoundError(
            f"{text!r}: {local_reading}; read as the Hugging Face Hub dataset "
            f"{repo_id}{at} it could not be fetched ({type(err).__name__}: {err}). Check the repo id and revision, "
            "log in with `hf auth login` for a private repo, or unset HF_HUB_OFFLINE if the cache does not hold it"
        ) from None


def store_files(directory: Path) -> list[str]:
    """The files that make up the finished store in ``directory`` (relative paths), from its manifest.

    Raises StoreIncompleteError for an unfinished build and StoreCorruptError for a non-store, so
    nothing half-built or foreign (the lock file, a killed writer's temp files) is ever shared.
    """
    manifest = load_manifest(directory)
    files = [MANIFEST_FILE]
    for shard in manifest.shards:
        files += [f"{SHARD_DIR}/{shard.name}{TENSOR_SUFFIX}", f"{SHARD_DIR}/{shard.name}{TEXT_SUFFIX}"]
    return files


def push_store(
    directory: str | os.PathLike[str],
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    message: str | None = None,
) -> str:
    """Upload the finished, verified store in ``directory`` to the Hub dataset ``repo_id``; returns the commit URL.

    The store is loaded (every file's SHA-256 checked) before anything is sent; only the
    manifest and its shards are uploaded. The repo is created if missing (``private`` then
    applies), and ``revision`` names a branch, created from the default branch if missing.
    """
    from huggingface_hub import HfApi

    directory = Path(directory)
    if parse_hub_spec(repo_id) is None or "@" in repo_id:
        raise ValueError(f"REPO_ID must be a Hub repo id org/name (give the branch with --revision), got {repo_id!r}")
    files = store_files(directory)
    store = ReferenceStore.load(directory)
    api = HfApi()
    api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, repo_type=REPO_TYPE, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type=REPO_TYPE,
        folder_path=str(directory),
        revision=revision,
        allow_patterns=files,
        commit_message=message or f"lm-eval-c3po reference store: {len(store)} records for {store.model.describe()}",
    )
    return str(getattr(commit, "commit_url", commit))
