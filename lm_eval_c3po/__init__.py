"""lm-eval-c3po: C3PO test-time expert re-mixing for MoE models under lm-eval.

The package root stays light (it is imported at start-up through a ``.pth``
hook); the heavy parts live in submodules:

folders in the order data flows through them (harvesting is ``reference_builders``):

- ``routing``: read and override the routing of every supported MoE family (one family table);
- ``store``: the reference store of correct pathways and its k-NN search;
- ``retrieve``: embedder, neighbourhoods, kernel weights (text -> neighbours + weights);
- ``score``: the neighbourhood loss and the scoring of choices (reference and prefix-cached);
- ``remix``: the methods (one table), their maths and the Remixer;
- ``lm_eval_model``: the thin ``--model c3po`` lm-eval model;
- ``report``, ``demo``: tables and pictures; the planted known-answer benchmark.
"""

from lm_eval_c3po import _autoregister  # noqa: F401  (registers --model c3po with lm-eval)

__version__ = "0.1.0"
