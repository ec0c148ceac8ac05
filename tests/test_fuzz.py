"""Fuzzing: model_args strings and store manifests never end in a bare traceback or a silent fallback."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lm_eval.utils import simple_parse_args_string

from lm_eval_c3po.remix import C3POConfig, C3POConfigError
from lm_eval_c3po.routing import SpecError
from lm_eval_c3po.store import ReferenceStore, StoreError, StoreWriter
from lm_eval_c3po.store.synthetic import synthetic_manifest, synthetic_record

OPTIONS = sorted(C3POConfig.field_names())
VALUES = st.one_of(
    st.integers(-5, 100).map(str), st.floats(-2, 3).map(str), st.sampled_from(
        ["ngd", "base", "icl", "gaussian", "matern", "cosine", "last:3", "first:2+last:3", "3+5", "all", "none",
         "True", "", "last:0", "middle", "1e-3", "nan", "inf", "-1"]),
    st.text(alphabet="abcdefgilmnrst:+0123456789._-", max_size=12),
)


class _Routing:  # the MoE shape resolved_for() checks against
    num_layers, num_experts, top_k = 16, 64, 8


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(OPTIONS + ["colour"]), VALUES, max_size=5))
def test_model_args_parse_or_fail_with_a_message(options):
    text = ",".join(f"{k}={v}" for k, v in options.items())
    try:
        parsed = simple_parse_args_string(text)
    except ValueError:
        return  # lm-eval's own parser refused the string (its own message)
    try:
        config = C3POConfig.from_model_args(parsed).resolved_for(_Routing)
    except (C3POConfigError, SpecError) as err:
        assert str(err).strip()
        return
    # Accepted: every option that was given took effect, none silently fell back to a default.
    for key, value in parsed.items():
        if key == "reference":
            assert config.reference == tuple(p for p in str(value).split("+") if p.strip())
        elif key not in ("layers", "dedup", "eps", "bandwidth", "alpha", "tol"):
            expected = str(value).strip() if isinstance(getattr(config, key), str) else value
            assert getattr(config, key) == expected
    assert config.layer_ids and all(0 <= i < 16 for i in config.layer_ids)
    assert 8 <= config.core_experts <= 64


@pytest.fixture(scope="module")
def store_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "store"
    with StoreWriter(path, synthetic_manifest(2, 4, 2, 8), keep="all", shard_size=2) as writer:
        for i in range(4):
            writer.add(synthetic_record(i, 2, 4, 8))
    return path


def _mutations():
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.text(max_size=6), st.just([]),
                     st.just({}))
    return st.lists(st.tuples(st.sampled_from(["drop", "set"]), st.lists(st.sampled_from(
        ["format_version", "model", "embedder", "num_records", "sources", "shards", "build", "num_layers",
         "num_experts", "top_k", "dim", "name", "routing_kind", "moe_layers", "digest", "rows", 0, 1]),
        min_size=1, max_size=3), leaf), min_size=1, max_size=3)


def _apply(doc, path, op, value):
    node = doc
    for key in path[:-1]:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return
    last = path[-1]
    if isinstance(node, dict) and last in node:
        if op == "drop":
            del node[last]
        else:
            node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_mutations())
def test_edited_manifests_load_or_fail_with_a_message(store_template, tmp_path_factory, mutations):
    path = tmp_path_factory.mktemp("case") / "store"
    shutil.copytree(store_template, path)
    manifest = path / "manifest.json"
    doc = json.loads(manifest.read_text())
    for op, keys, value in mutations:
        _apply(doc, keys, op, value)
    manifest.write_text(json.dumps(doc))
    try:
        store = ReferenceStore.load(path)
    except StoreError as err:
        assert str(path) in str(err) or "store" in str(err)
        return
    assert len(store) == store.manifest.num_records  # loaded: what it says it holds is what it holds
