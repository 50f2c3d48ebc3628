#!/usr/bin/python
"""Put a verified backup in a store's data dir, keeping the data it replaces until the
store is known to run again (then dropped, or put back)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ebuilder_instance_restore
short_description: Restore a store's data dir from a backup, with the old data kept aside
description:
  - O(state=unpacked) checks O(archive) end to end (O(sha256) and its C(.sha256) file, every
    member readable, none reaching outside its C(data/) directory, no device) and unpacks
    it to C(<data_dir>.restoring), owners and modes as they were; the store is not
    touched, so a corrupted archive is refused before anything changes and the store
    keeps running while a big archive unpacks.
  - O(state=swapped) (the container stopped: its bind mounts follow the path when it
    starts) moves the data dir to C(<data_dir>.before-restore) and the unpacked data in
    its place: two renames. A C(.before-restore) left by an earlier restore that never
    ended is kept under a name of its own, never deleted nor taken for the store's.
  - O(state=rolled_back) puts C(<data_dir>.before-restore) back; O(state=committed)
    deletes it.
  - A store that had no data dir (a clone) simply gets the archive's data.
options:
  archive:
    description: The backup, a tar.gz made by ebuilder_instance_backup.
    type: path
    required: true
  sha256:
    description: Its SHA-256 as recorded when it was made.
    type: str
    default: ""
  data_dir:
    description: The store's data dir.
    type: path
    required: true
  exclude:
    description: Entries of the archive's data dir not restored (a clone's own secret key).
    type: list
    elements: str
    default: []
  state:
    description: What to do.
    type: str
    choices: [unpacked, swapped, rolled_back, committed]
    default: unpacked
author:
  - eBuilder Provisioner
"""

EXAMPLES = r"""
- name: Refuse a corrupted backup before the store is touched.
  ebuilder_instance_restore:
    archive: /srv/ebuilder/backups/janes-shop-42/janes-shop-20261203T020000Z.tar.gz
    sha256: 0f1e2d...
    data_dir: /srv/ebuilder/customers/42
    state: unpacked
"""

RETURN = r"""
sha256:
  description: The archive's SHA-256, as verified.
  returned: when unpacked
  type: str
kept_aside:
  description: Where the replaced data waits until committed or rolled back.
  returned: when swapped
  type: str
earlier_kept:
  description: Where a C(.before-restore) of an earlier, unfinished restore was kept.
  returned: when swapped
  type: str
"""

import os  # noqa: E402 (Ansible wants the documentation first)
import shutil  # noqa: E402
import tarfile  # noqa: E402
import time  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible.module_utils.ebuilder_archive import TOP, verify  # noqa: E402

ASIDE = ".before-restore"
INCOMING = ".restoring"


def unpack(archive: str, target: str, exclude: list[str]) -> None:
    """The archive's data/ into `target` (new), owners and modes as they were."""
    prefix = TOP + "/"
    skipped = tuple(prefix + name for name in exclude)
    with tarfile.open(archive, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            if member.name == TOP or member.name in skipped or \
                    member.name.startswith(tuple(s + "/" for s in skipped)):
                continue
            member.name = member.name[len(prefix):]
            if member.islnk():
                member.linkname = member.linkname[len(prefix):]
            members.append(member)
        os.makedirs(target, mode=0o750)
        # Owners and modes as they were: Python's "data" filter would drop both. Every
        # member was checked by verify() (inside data/, no link leaving it, no device).
        options = {"filter": "fully_trusted"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(target, members=members, numeric_owner=True, **options)  # noqa: S202


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "archive": {"type": "path", "required": True},
            "sha256": {"type": "str", "default": ""},
            "data_dir": {"type": "path", "required": True},
            "exclude": {"type": "list", "elements": "str", "default": []},
            "state": {"type": "str", "default": "unpacked",
                      "choices": ["unpacked", "swapped", "rolled_back", "committed"]},
        })
    p = module.params
    data_dir = os.path.abspath(p["data_dir"])
    incoming = data_dir + INCOMING
    if p["state"] == "unpacked":
        try:
            checked = verify(p["archive"], p["sha256"])
        except ValueError as exc:
            module.fail_json(msg=f"backup refused, nothing was changed: {exc}")
        shutil.rmtree(incoming, ignore_errors=True)
        try:
            unpack(p["archive"], incoming, p["exclude"])
        except (OSError, tarfile.TarError) as exc:
            shutil.rmtree(incoming, ignore_errors=True)
            module.fail_json(msg=f"cannot unpack {p['archive']}, nothing was changed: {exc}")
        module.exit_json(changed=True, sha256=checked["sha256"], unpacked=incoming)
    if p["state"] == "swapped":
        if not os.path.isdir(incoming):
            module.fail_json(msg=f"nothing unpacked at {incoming}; nothing was changed")
        module.exit_json(changed=True, **swap(data_dir))
    if p["state"] == "rolled_back":
        module.exit_json(changed=roll_back(data_dir))
    module.exit_json(changed=commit(data_dir))


def swap(data_dir: str) -> dict:
    """The unpacked data in the data dir's place, the store's own kept aside."""
    aside, incoming = data_dir + ASIDE, data_dir + INCOMING
    kept = ""
    if os.path.isdir(aside):
        # An earlier restore ended before it was committed or rolled back: that data is
        # kept under a name of its own, never taken for the store's (nor deleted).
        kept = f"{aside}.{time.strftime('%Y%m%dT%H%M%S')}"
        os.rename(aside, kept)
    if os.path.isdir(data_dir):
        os.rename(data_dir, aside)
    os.rename(incoming, data_dir)
    return {"kept_aside": aside if os.path.isdir(aside) else "", "earlier_kept": kept}


def roll_back(data_dir: str) -> bool:
    """The store's own data back in place (a clone has none: its data stays)."""
    aside = data_dir + ASIDE
    if not os.path.isdir(aside):
        return False
    shutil.rmtree(data_dir, ignore_errors=True)
    os.rename(aside, data_dir)
    return True


def commit(data_dir: str) -> bool:
    """The restore held: what was kept aside, and anything left unpacked, goes."""
    aside, incoming = data_dir + ASIDE, data_dir + INCOMING
    changed = os.path.isdir(aside) or os.path.isdir(incoming)
    shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(incoming, ignore_errors=True)
    return changed


if __name__ == "__main__":
    main()
