"""The role's modules imported as Python, their module_utils registered under the
names Ansible ships them as (ansible.module_utils.<name>)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROLE = Path(__file__).resolve().parents[1] / "roles" / "ebuilder_instance"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


for _util in sorted((ROLE / "module_utils").glob("*.py")):
    _load(f"ansible.module_utils.{_util.stem}", _util)


def module_utils(name: str):
    return sys.modules[f"ansible.module_utils.{name}"]


def library(name: str):
    return _load(name, ROLE / "library" / f"{name}.py")
