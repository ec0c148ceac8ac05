"""setuptools' PEP 517 backend plus ``lm_eval_c3po_autoload.pth`` and, in wheels, the task YAMLs.

lm-eval 0.4 discovers models only through its in-process registry, so a plain
``lm_eval --model c3po`` must find ``c3po`` registered before lm-eval looks.
A ``.pth`` file in site-packages is the standard hook for that: Python runs
its ``import`` line at start-up. The line only installs an import hook (see
``lm_eval_c3po._autoregister``); nothing heavy is imported until lm-eval's
registry itself is.

The top-level ``task_configs/`` folder stays the one source of the task YAMLs
(``--include_path task_configs`` in a checkout, the tests' fixture twins
``include:`` them by relative path). A wheel carries a copy as
``lm_eval_c3po/task_configs/`` (setuptools cannot map a folder outside the
packages into one without a ``setup.py``), which the same hook registers with
lm-eval's task index. Editable installs read the checkout's folder directly.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F401,F403  (re-export the PEP 517 hooks)

PTH_NAME = "lm_eval_c3po_autoload.pth"
PTH_LINE = b"import lm_eval_c3po._autoregister\n"
TASK_CONFIGS = "task_configs"  # relative to the project root, the backend's working directory (PEP 517)
WHEEL_TASK_CONFIGS = "lm_eval_c3po/task_configs"
# Not shipped: the generator script (a development tool that rewrites the folder) and caches.
_SKIP_NAMES = {"_generate.py"}


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def task_config_files(root: Path = Path(TASK_CONFIGS)) -> dict[str, bytes]:
    """Every file of ``task_configs/`` (YAMLs, ``*_yaml`` templates, the Python their ``!function``
    lines import), keyed by its path in the wheel, in sorted order."""
    if not (root / "c3po_six.yaml").is_file():
        raise FileNotFoundError(f"{root.resolve()} holds no task configs: build the wheel from the project root")
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.name not in _SKIP_NAMES:
            files[f"{WHEEL_TASK_CONFIGS}/{path.relative_to(root).as_posix()}"] = path.read_bytes()
    return files


def _add_files(wheel_path: str, files: dict[str, bytes]) -> None:
    """Rewrite the wheel with ``files`` added and a matching RECORD line for each."""
    tmp = wheel_path + ".tmp"
    with zipfile.ZipFile(wheel_path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        for item in src.infolist():
            if item.filename != record_name:
                dst.writestr(item, src.read(item.filename))
        lines = []
        for name, data in files.items():
            dst.writestr(name, data)
            lines.append(f"{name},{_record_hash(data)},{len(data)}\n")
        dst.writestr(record_name, "".join(lines) + src.read(record_name).decode())
    os.replace(tmp, wheel_path)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = _orig.build_wheel(wheel_directory, config_settings, metadata_directory)
    _add_files(os.path.join(wheel_directory, name), {PTH_NAME: PTH_LINE, **task_config_files()})
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name = _orig.build_editable(wheel_directory, config_settings, metadata_directory)
    _add_files(os.path.join(wheel_directory, name), {PTH_NAME: PTH_LINE})  # task_configs/ read from the checkout
    return name
