"""Values handed to Ansible as data, never as templates.

Ansible renders any string in a variable as a Jinja template, so a store
name such as ``{{ lookup('pipe', 'id') }}`` would run on the provisioner's
machine. Every value this service gives Ansible (extra vars of its runs, the
DB inventory's variables) passes through here and is marked with Ansible's
own unsafe marker: ``!unsafe`` in YAML, ``{"__ansible_unsafe": ...}`` in the
JSON of an inventory script. Ansible then uses it verbatim.
"""

from __future__ import annotations

import re
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


# What an inventory host name may be (a store's subdomain is always one): it is a
# key, written as is, never marked.
HOST_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def stores_inventory_yaml(stores: list[dict]) -> str:
    """A YAML inventory of a run's stores: each a host of group `stores` whose one
    variable is its record (every string tagged !unsafe). Ansible reads a static
    inventory in one go, where adding hosts from a play cost ~7 ms per store."""
    for store in stores:
        if not HOST_NAME.fullmatch(str(store["name"])):
            raise ValueError(f"not a store name: {store['name']!r}")
    return extra_vars_yaml(
        {"stores": {"hosts": {store["name"]: {"provisioner_store": store} for store in stores}}})


def inventory_json_value(value: Any) -> Any:
    """A variable for an inventory script's JSON, every string wrapped as unsafe."""
    return _wrap(value, as_json=True)
