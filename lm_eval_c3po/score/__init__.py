"""Scoring rows with pathways written in: the neighbourhood loss and lm-eval's choices.

- :mod:`.examples`: items as token ids and lm-eval's causal rows (one truncation rule);
- :mod:`.loss`: the kernel-weighted choice cross-entropy over a row scorer;
- :mod:`.full_rows`: the reference scorer (whole model per row);
- :mod:`.trie_scorer`: the prefix-cached scorer, built from :mod:`.tries`, :mod:`.packing`,
  :mod:`.decoder`, :mod:`.first_layer`, :mod:`.prepare` and :mod:`.prefix_cache`;
- :mod:`.batch_hooks`: routing hooks around the padded batches lm-eval builds itself;
- :mod:`.footprint`: the bytes a loss call will hold, estimated from the model's shapes before it runs;
- :mod:`.cost`: counted work (token-layer evaluations) per phase.
"""

from lm_eval_c3po.score.batch_hooks import PathwayOverride, Request, RoutingRecorder, RowPlan
from lm_eval_c3po.score.examples import Example, Row, causal_row, layout_rows
from lm_eval_c3po.score.full_rows import FullRowScorer
from lm_eval_c3po.score.loss import OBJECTIVES, ChoiceLoss, RowScorer, choice_loss, gold_only, neighbourhood_loss
from lm_eval_c3po.score.prefix_cache import PrefixCache
from lm_eval_c3po.score.trie_scorer import TrieScorer, fast_path_applies

__all__ = [
    "OBJECTIVES",
    "ChoiceLoss",
    "Example",
    "FullRowScorer",
    "PathwayOverride",
    "PrefixCache",
    "Request",
    "Row",
    "RowPlan",
    "RowScorer",
    "RoutingRecorder",
    "TrieScorer",
    "causal_row",
    "choice_loss",
    "fast_path_applies",
    "gold_only",
    "layout_rows",
    "neighbourhood_loss",
]
