"""Per nginx host, in one pass: the stores of a play (every store finding its peers
on its own cost O(n²) and made `provisioner nginx` of 200 vhosts take minutes),
which of them have their vhost in step (tasks/in_step.yml), and which of those a
run over vhosts can leave alone."""

from __future__ import annotations


def nginx_site_groups(hostvars, play_hosts: list[str]) -> dict:
    """{nginx host: {"stores": [name, ...], "rendered": [...], "pruned": [...]}} for
    the stores of the play that rendered a vhost (render.yml), in play order."""
    groups: dict[str, dict[str, list]] = {}
    for name in play_hosts:
        facts = hostvars[name]
        rendered = facts.get("nginx_site_rendered") or {}
        if not rendered.get("host"):
            continue
        group = groups.setdefault(str(rendered["host"]),
                                  {"stores": [], "rendered": [], "pruned": []})
        group["stores"].append(name)
        group["rendered"].append(rendered)
        group["pruned"].extend(facts.get("nginx_site_pruned") or [])
    return groups


def nginx_site_in_step(listings: list[dict], stamp: str, catchall: str) -> dict:
    """Each store's verdict from its nginx host's listing (tasks/in_step.yml): '' when
    its vhost is the rendering, loaded by nginx, with no copy of it left over. A
    catch-all nginx has not loaded (catchall.yml just wrote it) keeps every store of
    that host in the run: their apply loads it."""
    verdicts = {}
    for listing in listings:
        files = {f["path"].rpartition("/")[2]: f for f in listing.get("files") or []}
        loaded_at = (files.get(stamp) or {}).get("mtime")
        catchall_at = (files.get(catchall) or {}).get("mtime")
        for store in listing["item"][1]:
            on_disk = files.get(store["file"])
            if listing.get("failed"):
                verdict = f"vhosts not listed: {listing.get('msg', 'unknown error')}"
            elif loaded_at is None or catchall_at is None or catchall_at > loaded_at:
                verdict = "nginx has not loaded this host's configuration"
            elif on_disk is None:
                verdict = "vhost missing"
            elif on_disk.get("checksum") != store["checksum"]:
                verdict = "vhost differs"
            elif on_disk["mtime"] > loaded_at:
                verdict = "vhost not reloaded yet"
            elif any(name.startswith(store["file"] + ".") for name in files):
                verdict = "a copy of the vhost is left over"
            else:
                verdict = ""
            verdicts[store["name"]] = verdict
    return verdicts


def nginx_site_left_alone(hosts: list[list[str]], verdicts: dict) -> list[str]:
    """Of each nginx host's stores (names, in play order), those whose vhost is in
    step and that a run over vhosts alone (playbooks/nginx.yml) can end. Where every
    store of an nginx host is in step, its first stays: that host still needs one
    store to remove the vhosts of stores that are gone and to reload nginx without
    them (prune.yml, apply.yml)."""
    ended = []
    for stores in hosts:
        in_step = [name for name in stores if verdicts.get(name) == ""]
        ended.extend(in_step[1:] if len(in_step) == len(stores) else in_step)
    return ended


class FilterModule:
    def filters(self):
        return {"nginx_site_groups": nginx_site_groups, "nginx_site_in_step": nginx_site_in_step,
                "nginx_site_left_alone": nginx_site_left_alone}
