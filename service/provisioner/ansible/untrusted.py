"""Values handed to Ansible as data, never as templates.

Ansible renders any string in a variable as a Jinja template, so a store
name such as ``{{ lookup('pipe', 'id') }}`` would run on the provisioner's
machine. Every value this service gives Ansible (extra vars of its runs, the
DB inventory's variables) passes through here and is marked with Ansible's
own unsafe marker: ``!unsafe`` in YAML, ``{"__ansible_unsafe": ...}`` in the
JSON of an inventory script. Ansible then uses it verbatim.
"""

from __future__ import annotations

from typing import Any

import yaml


class _Unsafe(str):
    """A string that the YAML dumper writes with the !unsafe tag."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _Unsafe, lambda dumper, value: dumper.represent_scalar("!unsafe", str(value)))


def _wrap(value: Any, as_json: bool) -> Any:
    if isinstance(value, str):
        return {"__ansible_unsafe": value} if as_json else _Unsafe(value)
    if isinstance(value, dict):
        # Keys are ours (variable names); only the values can carry someone's text.
        return {str(key): _wrap(item, as_json) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_wrap(item, as_json) for item in value]
    return value


def extra_vars_yaml(variables: dict) -> str:
    """Extra vars for `ansible-playbook -e @file`, every string tagged !unsafe."""
    return yaml.dump(_wrap(variables, as_json=False), Dumper=_Dumper, default_flow_style=False,
                     sort_keys=True, allow_unicode=True)


def inventory_json_value(value: Any) -> Any:
    """A variable for an inventory script's JSON, every string wrapped as unsafe."""
    return _wrap(value, as_json=True)
