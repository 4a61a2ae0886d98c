"""Both documented entry points register the handlers: `kopf run -m baton_operator` and the file form."""

from __future__ import annotations

import subprocess
import sys

from operator_testlib import OPERATOR_DIR, ROOT

CHECK = """
import importlib.util, sys
{load}
handlers = sys.modules["baton_operator.handlers"]  # importing it ran the kopf decorators
assert callable(handlers.reconcile_deployment) and callable(handlers.restore_target)
print("ok")
"""

BY_MODULE = "import baton_operator"
BY_FILE = ("spec = importlib.util.spec_from_file_location('main', {path!r})\n"
           "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)")


def run(code: str, pythonpath: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={"PYTHONPATH": pythonpath, "PATH": ""}, check=True).stdout


def test_module_entry_point_registers_every_handler() -> None:
    assert run(CHECK.format(load=BY_MODULE), str(OPERATOR_DIR)).strip() == "ok"


def test_file_entry_point_works_without_the_package_on_the_path() -> None:
    path = str(OPERATOR_DIR / "baton_operator" / "main.py")
    assert run(CHECK.format(load=BY_FILE.format(path=path)), "").strip() == "ok"
