"""A built wheel, installed into a fresh venv, brings the task YAMLs and lm-eval finds them without --include_path.

The wheel is built from a copy of the project (so a stale ``build/`` of the checkout cannot leak
in) by ``pip wheel --no-build-isolation`` with this interpreter's setuptools (the ``test`` extra
pins one new enough for the in-tree backend). The venv gets the wheel alone (``--no-deps``) and
sees this environment's packages (lm-eval, torch, ...) through a path line, without running
this environment's ``.pth`` hooks: the editable install of the checkout stays out of it. Nothing
is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs")

CHECK = r"""
import json, sys
import lm_eval_c3po
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from reference_builders.tasks import include_paths, task_manager

ours = include_paths([])
refs = task_manager(["c3po_ref_arc", "c3po_ref_winogrande", "c3po_ref_mmlu"], ours, {})  # what --preset resolves
functions = {}
for name in ("c3po_ref_knowref", "c3po_ref_multirc", "c3po_ref_bigbench_navigate", "c3po_ref_copa"):
    cfg = load_yaml(refs.task_index[name].yaml_path, resolve_func=True)  # every !function imports
    functions[name] = callable(cfg.get("doc_to_text")) or callable(cfg.get("process_docs"))
manager = TaskManager()  # lm_eval --tasks: lm-eval's defaults, no --include_path
print(json.dumps({
    "package": lm_eval_c3po.__file__,
    "include_paths": ours,
    "functions": functions,
    "found": {n: str(manager.task_index[n].yaml_path) for n in ("c3po_arc_challenge", "c3po_ref_arc", "c3po_six")
              if n in manager.all_tasks},
    "builtin": "arc_challenge" in manager.all_tasks,
}))
"""


def test_wheel_ships_task_configs_and_lm_eval_finds_them(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(src)], check=True, capture_output=True, text=True, cwd=tmp_path)
    (wheel,) = wheels.glob("lm_eval_c3po-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.removeprefix("lm_eval_c3po/task_configs/") for n in names if n.startswith("lm_eval_c3po/task_configs/")}
    source = {p.relative_to(ROOT / "task_configs").as_posix() for p in (ROOT / "task_configs").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    assert shipped == source - {"_generate.py"}
    assert "lm_eval_c3po_autoload.pth" in names

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, text=True, cwd=tmp_path)
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "_c3po_test_parent_env.pth").write_text(sysconfig.get_path("purelib") + "\n")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([str(python), "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    installed = purelib / "lm_eval_c3po"
    assert Path(out["package"]).parent == installed  # the wheel's copy, not the checkout
    assert out["include_paths"] == [str(installed / "task_configs")]
    assert all(out["functions"].values()), out["functions"]
    assert out["builtin"]
    assert out["found"] == {
        "c3po_arc_challenge": str(installed / "task_configs" / "c3po_arc_challenge.yaml"),
        "c3po_ref_arc": str(installed / "task_configs" / "reference" / "_c3po_ref_arc.yaml"),
        "c3po_six": str(installed / "task_configs" / "c3po_six.yaml"),
    }


def test_task_configs_join_an_index_of_lm_evals_builtins_only(tmp_path):
    from lm_eval_c3po._autoregister import task_configs_dir, with_task_configs

    builtin, ours, mine = tmp_path / "lm_eval_tasks", tmp_path / "ours", tmp_path / "mine"
    assert with_task_configs([builtin, mine], builtin, ours) == [builtin, ours, mine]  # user's paths still win
    assert with_task_configs([mine], builtin, ours) == [mine]  # TaskManager(include_defaults=False)
    assert with_task_configs([builtin, ours], builtin, ours) == [builtin, ours]  # --include_path of our folder: once
    assert with_task_configs([builtin], builtin, None) == [builtin]
    assert task_configs_dir() == ROOT / "task_configs"  # a checkout: the top-level folder
