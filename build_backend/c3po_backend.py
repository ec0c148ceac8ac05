"""setuptools' PEP 517 backend plus one file: ``lm_eval_c3po_autoload.pth``.

lm-eval 0.4 discovers models only through its in-process registry, so a plain
``lm_eval --model c3po`` must find ``c3po`` registered before lm-eval looks.
A ``.pth`` file in site-packages is the standard hook for that: Python runs
its ``import`` line at start-up. The line only installs an import hook (see
``lm_eval_c3po._autoregister``); nothing heavy is imported until lm-eval's
registry itself is.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F401,F403  (re-export the PEP 517 hooks)

PTH_NAME = "lm_eval_c3po_autoload.pth"
PTH_LINE = b"import lm_eval_c3po._autoregister\n"


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def _add_pth(wheel_path: str) -> None:
    """Rewrite the wheel with the .pth at its root and a matching RECORD line."""
    tmp = wheel_path + ".tmp"
    with zipfile.ZipFile(wheel_path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        for item in src.infolist():
            if item.filename != record_name:
                dst.writestr(item, src.read(item.filename))
        record = src.read(record_name).decode()
        dst.writestr(PTH_NAME, PTH_LINE)
        line = f"{PTH_NAME},{_record_hash(PTH_LINE)},{len(PTH_LINE)}\n"
        dst.writestr(record_name, line + record)
    os.replace(tmp, wheel_path)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = _orig.build_wheel(wheel_directory, config_settings, metadata_directory)
    _add_pth(os.path.join(wheel_directory, name))
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name = _orig.build_editable(wheel_directory, config_settings, metadata_directory)
    _add_pth(os.path.join(wheel_directory, name))
    return name
