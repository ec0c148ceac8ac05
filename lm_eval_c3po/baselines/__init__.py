"""The paper's trained test-time baselines (Table 1): prefix tuning and soft prompt (prompt tuning).

``c3po train-baseline`` trains a PEFT adapter on the reference sets with the
base model frozen (Section 4.1); the adapter evaluates through lm-eval's own
``peft=`` model arg. See :mod:`lm_eval_c3po.baselines.train`.
"""

from lm_eval_c3po.baselines.train import (
    METHODS,
    Example,
    TrainError,
    TrainSettings,
    check_forward,
    examples_from_docs,
    make_peft_model,
    reference_loss,
    save_adapter,
    train_adapter,
)

__all__ = [
    "METHODS",
    "Example",
    "TrainError",
    "TrainSettings",
    "check_forward",
    "examples_from_docs",
    "make_peft_model",
    "reference_loss",
    "save_adapter",
    "train_adapter",
]
