"""Leaderboard tables and routing plots from lm-eval results and c3po diagnostics (``c3po report``).

- ``results``: load lm-eval results JSONs into normalised runs (model, method, args, scores).
- ``table``: the paper-style leaderboard and its Markdown/CSV renderings (pure).
- ``sweeps``: one-parameter sweeps among the rows, for accuracy-vs-parameter plots.
- ``diagnostics``: read the per-context diagnostics JSONL of ``--model c3po``.
- ``plots``: matplotlib figures (heatmaps, routing weights, loss curves, sweeps).
- ``api``: ``write_report``, the single entry point the CLI and the demo call.
"""

from lm_eval_c3po.report.api import ReportFiles, write_report
from lm_eval_c3po.report.results import ReportError

__all__ = ["ReportError", "ReportFiles", "write_report"]
