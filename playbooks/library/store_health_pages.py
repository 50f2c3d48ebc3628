#!/usr/bin/python
"""Fetch many stores' health pages through one nginx at once, in one module call:
a module call per store costs a Python start each, which made a 500-store sweep
take minutes."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: store_health_pages
short_description: Fetch the health page of many stores through nginx, concurrently
description:
  - Sends C(GET <path>) over HTTPS to one nginx address with each store's own
    C(Host) header, many at a time, and returns each store's HTTP status.
  - A store that cannot be reached gets status -1 and the reason.
  - The certificate is not verified (the address is nginx itself, not a name).
options:
  address:
    description: nginx's HTTPS listen address, C(host:port).
    type: str
    required: true
  stores:
    description: The stores to check, each name (the key of its result) to the host
      name sent as its C(Host) header.
    type: dict
    required: true
  path:
    description: The page to fetch.
    type: str
    default: /health/
  timeout:
    description: Seconds each request may take.
    type: int
    default: 10
  concurrency:
    description: How many requests are in flight at once.
    type: int
    default: 32
author:
  - eBuilder Provisioner
"""

EXAMPLES = r"""
- name: Fetch every store's health page through nginx.
  store_health_pages:
    address: 127.0.0.1:443
    stores:
      janes-shop: janes-shop.example.com
  register: pages
"""

RETURN = r"""
pages:
  description: Each store's result, by name.
  returned: always
  type: dict
  sample: {"janes-shop": {"status": 200, "error": ""}}
"""

import http.client  # noqa: E402 (Ansible wants the documentation first)
import ssl  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402


def unverified_context() -> ssl.SSLContext:
    """One for every request: making one loads the CA store (~20 ms of CPU each, which
    made 500 stores cost 10 s of the sweep); nothing is verified anyway."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def fetch(address: str, fqdn: str, path: str, timeout: int, context: ssl.SSLContext) -> dict:
    host, _, port = address.rpartition(":")
    connection = http.client.HTTPSConnection(host.strip("[]") or "127.0.0.1", int(port),
                                             timeout=timeout, context=context)
    try:
        connection.request("GET", path, headers={"Host": fqdn, "Connection": "close"})
        response = connection.getresponse()
        response.read()
        return {"status": response.status, "error": ""}
    except (OSError, http.client.HTTPException) as exc:
        return {"status": -1, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        connection.close()


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "address": {"type": "str", "required": True},
            "stores": {"type": "dict", "required": True},
            "path": {"type": "str", "default": "/health/"},
            "timeout": {"type": "int", "default": 10},
            "concurrency": {"type": "int", "default": 32},
        },
        supports_check_mode=True)
    params = module.params
    stores = params["stores"]
    context = unverified_context()
    with ThreadPoolExecutor(max_workers=max(1, min(params["concurrency"], len(stores) or 1))) \
            as pool:
        results = pool.map(lambda fqdn: fetch(params["address"], str(fqdn), params["path"],
                                              params["timeout"], context), stores.values())
        pages = dict(zip(stores, results, strict=True))
    module.exit_json(changed=False, pages=pages)


if __name__ == "__main__":
    main()
