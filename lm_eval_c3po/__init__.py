"""lm-eval-c3po: C3PO test-time expert re-mixing for MoE models under lm-eval.

The package root stays light (it is imported at start-up through a ``.pth``
hook); the heavy parts live in submodules:

- ``lm_eval_c3po.routing``: read and override the routing of any transformers MoE family.
- ``lm_eval_c3po.store``: the reference store of correct pathways and its k-NN search.
- ``lm_eval_c3po.methods``: the re-mixing maths (kernels, mode finding, kernel regression, NGD).
- ``lm_eval_c3po.lm_eval_model``: the ``--model c3po`` lm-eval model.
"""

from lm_eval_c3po import _autoregister  # noqa: F401  (registers --model c3po with lm-eval)

__version__ = "0.1.0"
