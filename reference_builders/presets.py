"""Which reference sets serve which benchmark, and how many docs each gives: the paper's Table 7.

Each preset names a group in ``task_configs/`` (``c3po_ref_*``); HellaSwag and
PIQA share the commonsense references, ARC-Challenge and ARC-Easy share ``arc``.
``TABLE7_SIZES`` gives each reference source (a task or group) the size the paper
used; :mod:`reference_builders.sampling` draws that many docs from it.
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


# Reference set sizes of the paper's Table 7 (Appendix A.2), by lm-eval task or group.
TABLE7_SIZES: dict[str, int] = {
    "c3po_ref_bigbench": 8000,
    "c3po_ref_superglue": 8000,
    "c3po_ref_commonsense_qa": 6000,
    "c3po_ref_social_iqa": 6000,
    "c3po_ref_openbookqa": 2000,
    "c3po_ref_sciq": 2000,
    "c3po_ref_knowref": 2000,
}
# `--sample-size bigbench=N` is short for `--sample-size c3po_ref_bigbench=N`.
SOURCE_PREFIX = "c3po_ref_"


def sample_sizes(specs: list[str], all_docs: bool, known: set[str]) -> dict[str, int | None]:
    """Source -> docs to sample (None: every doc) from ``--sample-size SOURCE=N`` and ``--all-docs``.

    Starts from Table 7 (or from nothing under ``--all-docs``: every doc of every task) and applies
    each ``SOURCE=N`` (``N`` a doc count, or ``all``). ``SOURCE`` is an lm-eval task or group
    among the requested ones (``known``), or a Table 7 name without the ``c3po_ref_`` prefix.
    """
    sizes: dict[str, int | None] = {} if all_docs else {s: n for s, n in TABLE7_SIZES.items() if s in known}
    for spec in specs:
        source, sep, value = spec.partition("=")
        source, value = source.strip(), value.strip()
        if not sep or not source or not value:
            raise BuildError(f"--sample-size takes SOURCE=N (e.g. bigbench=4000 or c3po_ref_sciq=all), got {spec!r}")
        if source not in known and SOURCE_PREFIX + source in known:
            source = SOURCE_PREFIX + source
        if source not in known:
            raise BuildError(
                f"--sample-size {spec}: {source!r} is not one of the requested tasks or groups "
                f"({', '.join(sorted(known))})"
            )
        if value == "all":
            sizes[source] = None
        elif value.isdigit():
            sizes[source] = int(value)
        else:
            raise BuildError(f"--sample-size {spec}: N must be a doc count (0 or more) or 'all', got {value!r}")
    return sizes


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
