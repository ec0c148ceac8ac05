"""Which reference sets serve which benchmark: the paper's Table 7, as lm-eval groups.

Each preset names a group in ``task_configs/`` (``c3po_ref_*``); HellaSwag and
PIQA share the commonsense references, ARC-Challenge and ARC-Easy share ``arc``.
"""

from __future__ import annotations

from reference_builders.errors import BuildError

PRESETS: dict[str, str] = {
    "mmlu": "c3po_ref_mmlu",  # BIG-Bench + SuperGLUE
    "hellaswag": "c3po_ref_commonsense",  # CommonsenseQA + SocialIQA
    "piqa": "c3po_ref_commonsense",
    "arc": "c3po_ref_arc",  # OpenBookQA + SciQ
    "winogrande": "c3po_ref_winogrande",  # KnowRef
}


def requested_tasks(tasks: str | None, preset: str | None) -> list[str]:
    """The lm-eval task/group names to harvest, from ``--tasks a,b`` or ``--preset NAME``."""
    if preset is not None:
        if preset not in PRESETS:
            raise BuildError(f"unknown preset {preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
        return [PRESETS[preset]]
    names = [name.strip() for name in (tasks or "").split(",") if name.strip()]
    if not names:
        raise BuildError("no tasks given: pass --tasks name1,name2 (lm-eval task or group names) or --preset")
    return names
