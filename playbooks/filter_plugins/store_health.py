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


def health_targets(hostvars, stores: list[str], by: str = "docker_host") -> dict:
    """The stores to check, by Docker host (their containers) or by nginx host
    (`by="edge"`: their pages): {host: {store name: its fqdn}}. Reads each store's
    `health_store` fact (tasks/where_stores_live.yml): a store's own variables read
    through hostvars lose the play's context (a host's provisioner_edge or data root
    would be ignored)."""
    targets: dict[str, dict[str, str]] = {}
    for name in stores:
        where = hostvars[name]["health_store"]
        targets.setdefault(str(where[by]), {})[name] = str(where["fqdn"])
    return targets


def health_verdicts(hostvars, stores: list[str], listings: dict, pages: dict) -> dict:
    """Each store's verdict, by name: '' when healthy, else why not.

    `listings` and `pages` are the registered results of the run_once loops over the
    Docker hosts (docker_host_info) and the nginx hosts (store_health_pages), one item
    per host."""
    listing_of, pages_of = _by_item(listings), _by_item(pages)
    containers: dict[str, dict[str, dict]] = {}
    verdicts = {}
    for name in stores:
        store = hostvars[name]
        where = store["health_store"]
        engine = str(where["docker_host"])
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
        pages = (pages_of.get(str(where["edge"])) or {}).get("pages") or {}
        page = pages.get(name) or {"status": -1}
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


def disk_targets(hostvars, stores: list[str]) -> dict:
    """The data dir of each store, by Docker host: {host: {data dir: store name}}."""
    targets: dict[str, dict[str, str]] = {}
    for name in stores:
        where = hostvars[name]["health_store"]
        targets.setdefault(str(where["docker_host"]), {})[str(where["data_dir"])] = name
    return targets


def disk_usage(targets: dict, measured: dict) -> dict:
    """MiB each store's data dir takes, by name, from each host's `du -sk` (a store
    whose dir could not be measured is left out: no figure beats a wrong one)."""
    usage = {}
    for host, result in _by_item(measured).items():
        names = targets.get(host) or {}
        for line in str(result.get("stdout") or "").splitlines():
            size, _, path = line.partition("\t")
            if size.isdigit() and path in names:
                usage[names[path]] = round(int(size) / 1024, 1)
    return usage


class FilterModule:
    def filters(self):
        return {"health_targets": health_targets, "health_verdicts": health_verdicts,
                "disk_targets": disk_targets, "disk_usage": disk_usage}
