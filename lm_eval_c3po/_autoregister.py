"""Make lm-eval know ``--model c3po`` and this package's tasks the moment it loads.

Imported at interpreter start-up by ``lm_eval_c3po_autoload.pth``, so it must
stay cheap: it imports nothing heavy and only installs a meta-path hook that
acts when lm-eval's own modules are executed:

* ``lm_eval.api.registry``: registers ``c3po`` as a lazy placeholder (our
  module is imported only when the model is asked for) and imports
  ``lm_eval.models`` so that lm-eval's own models are registered too: lm-eval
  imports them only while its registry is empty, which ours would no longer be.
* ``lm_eval.tasks._index``: every task index that includes lm-eval's built-in
  tasks (``TaskManager()``'s default, what ``lm_eval --tasks`` uses) also
  indexes this package's ``task_configs/``, right after the built-ins, so
  ``lm_eval --tasks c3po_arc_challenge`` works without ``--include_path``
  and a user's ``--include_path`` still overrides our YAMLs.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

_REGISTRY = "lm_eval.api.registry"
_TASK_INDEX = "lm_eval.tasks._index"
MODEL_NAME = "c3po"
MODEL_PATH = "lm_eval_c3po.lm_eval_model:C3POLM"
# A file only our task folder has: how a source checkout's task_configs/ is told from any other.
_MARKER = "c3po_six.yaml"


def task_configs_dir() -> Path | None:
    """This package's lm-eval task YAMLs: inside the package when installed from a wheel
    (``lm_eval_c3po/task_configs``, put there by the build backend), else the source checkout's
    top-level ``task_configs/`` (editable installs, PYTHONPATH); None if neither exists."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "task_configs", here.parent / "task_configs"):
        if (candidate / _MARKER).is_file():
            return candidate
    return None


def register(registry_module) -> None:
    """Register the c3po model (lazily) and lm-eval's built-ins in ``registry_module``."""
    registry = registry_module.model_registry
    if MODEL_NAME not in registry:
        registry.register(MODEL_NAME, target=MODEL_PATH)
    import lm_eval.models  # noqa: F401  (registers hf, dummy, ... as lazy placeholders)


def with_task_configs(paths: list[Path], builtin: Path, ours: Path | None) -> list[Path]:
    """``paths`` with ``ours`` inserted right after lm-eval's ``builtin`` folder.

    Only when the built-ins are indexed (``TaskManager(include_defaults=False)`` asks for its
    own paths alone) and ``ours`` is not already among the paths.
    """
    resolved = [Path(p).resolve() for p in paths]
    if ours is None or builtin.resolve() not in resolved or ours.resolve() in resolved:
        return list(paths)
    at = resolved.index(builtin.resolve()) + 1
    return [*paths[:at], ours, *paths[at:]]


def register_task_configs(index_module) -> None:
    """Wrap ``TaskIndex.build`` so that indexes of lm-eval's built-ins include our task_configs/."""
    task_index = index_module.TaskIndex
    build = task_index.build
    if getattr(build, "_c3po", False):
        return
    builtin = Path(index_module.__file__).resolve().parent  # lm_eval/tasks/, TaskManager's default folder

    def build_with_ours(paths, *args, **kwargs):
        return build(with_task_configs(list(paths), builtin, task_configs_dir()), *args, **kwargs)

    build_with_ours._c3po = True
    task_index.build = staticmethod(build_with_ours)


_HOOKS = {_REGISTRY: register, _TASK_INDEX: register_task_configs}


class _HookLoader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader, hook):
        self._wrapped = wrapped
        self._hook = hook

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module) -> None:
        self._wrapped.exec_module(module)
        self._hook(module)


class _HookFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        hook = _HOOKS.get(fullname)
        if hook is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _HookLoader(spec.loader, hook)
        return spec


def install() -> None:
    for name, hook in _HOOKS.items():
        if name in sys.modules:
            hook(sys.modules[name])
    if not any(isinstance(f, _HookFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _HookFinder())


install()
