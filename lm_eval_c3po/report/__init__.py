"""Leaderboard tables and routing plots from lm-eval results and c3po diagnostics (``c3po report``).

- ``results``: load lm-eval results JSONs into normalised runs (model, method, args, scores).
- ``table``: the paper-style leaderboard and its Markdown/CSV renderings (pure).
- ``sweeps``: one-parameter sweeps among the rows, for accuracy-vs-parameter plots.
- ``samples``: lm-eval ``--log_samples`` files, and the join of two runs question by question.
- ``paired``: flips, exact McNemar p, paired-bootstrap interval (pure); ``paired_table``: the table of them.
- ``diagnostics``: read the per-context diagnostics JSONL of ``--model c3po``.
- ``analyses``: expert coverage, accuracy per NGD step, cost per question (pure), diagnostics -> run link.
- ``plots``: matplotlib figures (heatmaps, routing weights, loss curves, sweeps, coverage, steps, cost).
- ``figures``: every output drawn from diagnostics runs, joined with their run's samples.
- ``api``: ``write_report``, the single entry point the CLI and the demo call.
- ``grid`` and ``reproduce``: ``c3po reproduce``, experiment grids (``grids/*.yaml``) run through lm-eval.
"""

from lm_eval_c3po.report.api import ReportFiles, write_report
from lm_eval_c3po.report.results import ReportError

__all__ = ["ReportError", "ReportFiles", "write_report"]
