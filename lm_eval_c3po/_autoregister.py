"""Register ``--model c3po`` with lm-eval the moment lm-eval's registry loads.

Imported at interpreter start-up by ``lm_eval_c3po_autoload.pth``, so it must
stay cheap: it imports nothing heavy and only installs a meta-path hook. When
``lm_eval.api.registry`` is executed, the hook registers ``c3po`` as a lazy
placeholder (our module is imported only when the model is asked for) and
imports ``lm_eval.models`` so that lm-eval's own models are registered too:
lm-eval imports them only while its registry is empty, which ours would no
longer be.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_TARGET = "lm_eval.api.registry"
MODEL_NAME = "c3po"
MODEL_PATH = "lm_eval_c3po.lm_eval_model:C3POLM"


def register(registry_module) -> None:
    """Register the c3po model (lazily) and lm-eval's built-ins in ``registry_module``."""
    registry = registry_module.model_registry
    if MODEL_NAME not in registry:
        registry.register(MODEL_NAME, target=MODEL_PATH)
    import lm_eval.models  # noqa: F401  (registers hf, dummy, ... as lazy placeholders)


class _RegistryLoader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader):
        self._wrapped = wrapped

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module) -> None:
        self._wrapped.exec_module(module)
        register(module)


class _RegistryFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegistryLoader(spec.loader)
        return spec


def install() -> None:
    if _TARGET in sys.modules:
        register(sys.modules[_TARGET])
    elif not any(isinstance(f, _RegistryFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder())


install()
