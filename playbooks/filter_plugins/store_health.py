"""Judge every store of a health run in one pass on the controller: a judging task
per store cost ~0.3 s each (its variables templated over every host's results),
which made a 500-store sweep take minutes."""

from __future__ import annotations


def _ours(labels: dict, instance_id: str, installation: str) -> bool:
    """The role's rule (ebuilder_instance tasks/main.yml), old unlabelled containers too."""
    if labels.get("ebuilder.instance_id", "") != instance_id:
        return False
    if "ebuilder.installation" in labels:
        return labels["ebuilder.installation"] == installation
    return labels.get("ebuilder.managed", "") == "true"


def _by_item(results: dict | None) -> dict:
    return {r.get("item"): r for r in (results or {}).get("results", [])}


def health_targets(hostvars, stores: list[str]) -> dict:
    """The stores to check, by Docker host: {host: {store name: its fqdn}}."""
    targets: dict[str, dict[str, str]] = {}
    for name in stores:
        store = hostvars[name]
        targets.setdefault(str(store["store_docker_host"]), {})[name] = str(store["store_fqdn"])
    return targets


def health_verdicts(hostvars, stores: list[str], listings: dict, pages: dict) -> dict:
    """Each store's verdict, by name: '' when healthy, else why not.

    `listings` and `pages` are the registered results of the run_once loops over the
    Docker hosts (docker_host_info, store_health_pages), one item per host."""
    listing_of, pages_of = _by_item(listings), _by_item(pages)
    containers: dict[str, dict[str, dict]] = {}
    verdicts = {}
    for name in stores:
        store = hostvars[name]
        engine = str(store["store_docker_host"])
        listing = listing_of.get(engine, {"failed": True, "msg": "not listed"})
        if listing.get("failed"):
            verdicts[name] = (f"unhealthy: cannot read containers on {engine}: "
                              f"{listing.get('msg') or 'unknown error'}")
            continue
        if engine not in containers:
            containers[engine] = {n.lstrip("/"): c for c in listing.get("containers") or []
                                  for n in c.get("Names") or []}
        # The role's container name (ebuilder_instance vars/main.yml).
        container = containers[engine].get(f"ebuilder_{store['ebuilder_instance_subdomain']}")
        page = ((pages_of.get(engine) or {}).get("pages") or {}).get(name) or {"status": -1}
        labels = (container or {}).get("Labels") or {}
        if container is None:
            state = "missing"
        elif not _ours(labels, str(store["ebuilder_instance_id"]),
                       str(store["ebuilder_instance_installation_id"])):
            state = f"not ours (installation {labels.get('ebuilder.installation', 'none')})"
        else:
            state = container.get("State", "unknown")
        healthy = state == "running" and page.get("status") == 200
        verdicts[name] = "" if healthy else f"unhealthy: container {state}, HTTP {page['status']}"
    return verdicts


class FilterModule:
    def filters(self):
        return {"health_targets": health_targets, "health_verdicts": health_verdicts}
