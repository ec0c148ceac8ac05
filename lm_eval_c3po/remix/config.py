"""The ``--model c3po`` options (lm-eval ``model_args``), validated in one place.

lm-eval splits ``model_args`` on commas and converts numbers and booleans, so
list-valued options use ``+``: ``reference=refs/a+refs/b``,
``layers=first:2+last:3``. Every bad value fails here, at model construction,
with a message that names the option and the valid choices, instead of deep
inside an evaluation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lm_eval_c3po.remix.memory import AUTO, parse_bytes
from lm_eval_c3po.remix.methods import METHODS, MODE_NEIGHBOURHOODS
from lm_eval_c3po.remix.ngd import SCHEDULES
from lm_eval_c3po.retrieve import BANDWIDTH_RULES, DEFAULT_EMBEDDER, KERNEL_CHOICES
from lm_eval_c3po.routing import DEFAULT_TOKENS, RoutingController, parse_layers, validate_token_spec
from lm_eval_c3po.score import OBJECTIVES

DEFAULT_CORE_EXPERTS = 20
DEFAULT_LAST_LAYERS = 5
INT_FIELDS = ("k", "steps", "mode_iters", "remix_batch_size", "seed", "core_experts", "degree", "eps_candidates")


class C3POConfigError(ValueError):
    """A ``--model c3po`` option with a bad value."""


@dataclass(frozen=True)
class C3POConfig:
    method: str = "base"
    reference: tuple[str, ...] = ()
    k: int = 3
    eps: float | None = None
    eps_candidates: int = 64  # an epsilon-ball is searched among this many nearest references
    kernel: str = "gaussian"
    bandwidth: float | str = "store"  # "store": from the references' own neighbours; "median": per context
    degree: int = 2  # polynomial kernel (cos + coef0) ** degree
    coef0: float = 1.0
    layers: str | None = None  # None: the last 5 MoE layers (all of them if the model has fewer)
    tokens: str = DEFAULT_TOKENS
    core_experts: int | None = None  # None: min(20, experts)
    steps: int = 10
    lr: float = 1e-1
    lr_min: float = 1e-5
    schedule: str = "cosine"
    keep_best: bool = True  # NGD returns the best iterate seen (False: the last)
    tol: float | None = None  # NGD stops a context once its loss changes by at most this (off)
    loss: str = "choices"  # the neighbourhood loss l: "choices" cross-entropy, or the "gold" answer's NLL
    alpha: float | None = None  # None: kernel regression searches the grid; mode finding uses 0.5
    mode_iters: int = 5
    mode_neighbourhood: str = "pathways"  # mode finding among the store's pathways, or the "text" neighbours
    dedup: float | None = 0.95
    embedder: str = DEFAULT_EMBEDDER
    seed: int = 1234
    diagnostics: str | None = None
    record_steps: bool = False  # diagnostics: the test context's predicted choice at every NGD step
    remix_batch_size: int = 32
    remix_memory: str | int = AUTO  # bytes one optimisation may hold (8GB, 512MiB, ...): auto = half the free memory
    layer_ids: tuple[int, ...] = field(default=(), compare=False)  # resolved against the model

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} - {"layer_ids"}

    @classmethod
    def from_model_args(cls, args: dict[str, Any]) -> C3POConfig:
        unknown = set(args) - cls.field_names()
        if unknown:
            raise C3POConfigError(f"unknown c3po option(s) {sorted(unknown)}; valid: {sorted(cls.field_names())}")
        values = dict(args)
        if "reference" in values:
            values["reference"] = _split_plus(values["reference"])
        for name in ("layers", "tokens", "embedder", "diagnostics", "method", "kernel", "schedule", "loss",
                     "mode_neighbourhood"):
            if values.get(name) is not None:
                values[name] = str(values[name]).strip()
        for name in ("dedup", "eps", "alpha", "tol"):
            if isinstance(values.get(name), str) and values[name].lower() in ("none", "off", "false", ""):
                values[name] = None
        for name in ("dedup", "tol"):
            if values.get(name) is False:
                values[name] = None
        for name in ("keep_best", "record_steps"):
            if isinstance(values.get(name), str) and values[name].lower() in ("true", "false"):
                values[name] = values[name].lower() == "true"
        if isinstance(values.get("bandwidth"), str):
            values["bandwidth"] = _number_or_word(values["bandwidth"].strip())
        config = cls(**values)
        config.validate()
        ints = {name: int(getattr(config, name)) for name in INT_FIELDS if getattr(config, name) is not None}
        return dataclasses.replace(config, **ints)  # k=3.0 from a YAML or a script is k=3

    def validate(self) -> None:
        _choice("method", self.method, tuple(METHODS))
        _choice("kernel", self.kernel, KERNEL_CHOICES)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("loss", self.loss, OBJECTIVES)
        _choice("mode_neighbourhood", self.mode_neighbourhood, MODE_NEIGHBOURHOODS)
        for name in ("keep_best", "record_steps"):
            if not isinstance(getattr(self, name), bool):
                raise C3POConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        if isinstance(self.bandwidth, str):
            _choice("bandwidth", self.bandwidth, BANDWIDTH_RULES)
        else:
            _number("bandwidth", self.bandwidth, float, low=0, open_low=True)
        _number("degree", self.degree, int, low=1)
        _number("coef0", self.coef0, float, low=0)
        _number("eps_candidates", self.eps_candidates, int, low=1)
        _number("k", self.k, int, low=1)
        _number("steps", self.steps, int, low=0)
        _number("mode_iters", self.mode_iters, int, low=1)
        _number("remix_batch_size", self.remix_batch_size, int, low=1)
        try:
            parse_bytes(self.remix_memory)
        except ValueError as err:
            raise C3POConfigError(str(err)) from None
        _number("seed", self.seed, int, low=0)
        _number("lr", self.lr, float, low=0, open_low=True)
        _number("lr_min", self.lr_min, float, low=0)
        if self.lr_min > self.lr:
            raise C3POConfigError(f"lr_min={self.lr_min} is above lr={self.lr}: the schedule decays from lr to lr_min")
        for name, low, high in (("eps", 0, 2), ("alpha", 0, 1), ("dedup", 0, 1), ("tol", 0, None)):
            value = getattr(self, name)
            if value is not None:
                _number(name, value, float, low=low, high=high, open_low=name in ("eps", "dedup"))
        if self.core_experts is not None:
            _number("core_experts", self.core_experts, int, low=1)
        validate_token_spec(self.tokens)
        if self.reference:
            self.stores_by_task()  # a malformed mapping fails here, not mid-run
        if METHODS[self.method].needs_reference and not self.reference:
            raise C3POConfigError(
                f"method={self.method} needs reference stores: add reference=DIR (several: DIR1+DIR2), "
                "built with `c3po build-reference`"
            )

    def stores_by_task(self) -> dict[str, tuple[str, ...]]:
        """Which reference stores each lm-eval task retrieves from: ``{task name or glob: store paths}``.

        ``reference=DIR`` (or ``DIR1+DIR2``, merged into one) serves every task
        (key ``*``). ``reference=TASK=DIR+TASK2=DIR2`` or a YAML/JSON file
        ``{task name or glob: DIR or [DIRs]}`` gives each task its own store, as
        the paper pairs each benchmark with its Table 7 reference sets.
        """
        if len(self.reference) == 1 and Path(self.reference[0]).suffix in (".yaml", ".yml", ".json"):
            return _read_store_map(Path(self.reference[0]))
        pairs = [part.partition("=") for part in self.reference]
        if not any(sep for _, sep, _ in pairs):
            return {ANY_TASK: tuple(self.reference)}
        if not all(sep and task and path for task, sep, path in pairs):
            raise C3POConfigError(
                f"reference={'+'.join(self.reference)} mixes task=store pairs with bare stores: give every store "
                "its task (reference=TASK=DIR+TASK2=DIR2, globs allowed) or pass one mapping file"
            )
        mapping: dict[str, tuple[str, ...]] = {}
        for task, _, path in pairs:
            mapping[task.strip()] = mapping.get(task.strip(), ()) + (path.strip(),)
        return mapping

    def resolved_for(self, routing: RoutingController) -> C3POConfig:
        """Check the options against the model's MoE shape and fill the model-dependent defaults."""
        spec = self.layers if self.layers is not None else f"last:{min(DEFAULT_LAST_LAYERS, routing.num_layers)}"
        layer_ids = tuple(parse_layers(spec, routing.num_layers))
        core = self.core_experts
        if core is None:
            core = min(DEFAULT_CORE_EXPERTS, routing.num_experts)
        if not routing.top_k <= core <= routing.num_experts:
            raise C3POConfigError(
                f"core_experts={core} is outside [top_k, experts] = [{routing.top_k}, {routing.num_experts}] "
                "for this model: fewer than top-k core experts could not form a routing, more than the "
                "model has do not exist"
            )
        return dataclasses.replace(self, layer_ids=layer_ids, core_experts=core)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["reference"] = list(self.reference)
        out["layer_ids"] = list(self.layer_ids)
        return out


ANY_TASK = "*"


def _read_store_map(path: Path) -> dict[str, tuple[str, ...]]:
    """``{task or glob: store paths}`` from a YAML/JSON file; relative store paths are from the file's folder."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise C3POConfigError(f"reference={path}: cannot read the task-to-store mapping ({err})") from None
    if not isinstance(data, dict) or not data or not all(
        isinstance(k, str) and (isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v)))
        for k, v in data.items()
    ):
        raise C3POConfigError(
            f"reference={path} must map lm-eval task names (or globs such as c3po_mmlu_*) to a store directory "
            "or a list of them, e.g. `c3po_arc_challenge: refs/arc`"
        )
    return {task: tuple(str(path.parent / p) for p in ([v] if isinstance(v, str) else v)) for task, v in data.items()}


def _split_plus(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    return tuple(part.strip() for part in str(value).split("+") if part.strip())


def _number_or_word(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value.lower()


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise C3POConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def _number(name, value, kind, low=None, high=None, open_low=False) -> None:
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok_type = ok_type and float(value).is_integer()
    if not ok_type or not math.isfinite(float(value)):
        raise C3POConfigError(f"{name}={value!r} must be {'an integer' if kind is int else 'a number'}")
    if low is not None and (value < low or (open_low and value == low)):
        raise C3POConfigError(f"{name}={value} must be {'>' if open_low else '>='} {low}")
    if high is not None and value > high:
        raise C3POConfigError(f"{name}={value} must be <= {high}")
