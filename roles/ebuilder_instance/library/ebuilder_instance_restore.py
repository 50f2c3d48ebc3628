#!/usr/bin/python
"""Put a verified backup in a store's data dir, keeping the data it replaces until the
store is known to run again (then dropped, or put back)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ebuilder_instance_restore
short_description: Restore a store's data dir from a backup, with the old data kept aside
description:
  - O(state=verified) checks O(archive) end to end (O(sha256) and its C(.sha256) file, every
    member readable, none reaching outside its C(data/) directory) and changes nothing:
    a corrupted archive is refused before the store is touched.
  - O(state=restored) verifies again, unpacks the archive beside the data dir, then moves
    the data dir to C(<data_dir>.before-restore) and the unpacked data in its place. The
    container must be stopped (its bind mounts follow the path when it starts).
  - O(state=rolled_back) puts C(<data_dir>.before-restore) back; O(state=committed) deletes it.
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
    choices: [verified, restored, rolled_back, committed]
    default: restored
author:
  - eBuilder Provisioner
"""

EXAMPLES = r"""
- name: Refuse a corrupted backup before the store is touched.
  ebuilder_instance_restore:
    archive: /srv/ebuilder/backups/janes-shop-42/janes-shop-20261203T020000Z.tar.gz
    sha256: 0f1e2d...
    data_dir: /srv/ebuilder/customers/42
    state: verified
"""

RETURN = r"""
sha256:
  description: The archive's SHA-256, as verified.
  returned: when verified or restored
  type: str
kept_aside:
  description: Where the replaced data waits until committed or rolled back.
  returned: when restored
  type: str
"""

import os  # noqa: E402 (Ansible wants the documentation first)
import shutil  # noqa: E402
import tarfile  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible.module_utils.ebuilder_archive import TOP, verify  # noqa: E402

ASIDE = ".before-restore"


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
        # Python's own check too where it has one (3.11.4+); every member was already
        # checked by verify(): inside data/, no link leaving it, no device.
        options = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(target, members=members, numeric_owner=True, **options)  # noqa: S202


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "archive": {"type": "path", "required": True},
            "sha256": {"type": "str", "default": ""},
            "data_dir": {"type": "path", "required": True},
            "exclude": {"type": "list", "elements": "str", "default": []},
            "state": {"type": "str", "default": "restored",
                      "choices": ["verified", "restored", "rolled_back", "committed"]},
        })
    p = module.params
    data_dir = os.path.abspath(p["data_dir"])
    aside, incoming = data_dir + ASIDE, data_dir + ".restoring"
    if p["state"] in ("verified", "restored"):
        try:
            checked = verify(p["archive"], p["sha256"])
        except ValueError as exc:
            module.fail_json(msg=f"backup refused, nothing was changed: {exc}")
        if p["state"] == "verified":
            module.exit_json(changed=False, sha256=checked["sha256"])
        shutil.rmtree(incoming, ignore_errors=True)
        try:
            unpack(p["archive"], incoming, p["exclude"])
        except (OSError, tarfile.TarError) as exc:
            shutil.rmtree(incoming, ignore_errors=True)
            module.fail_json(msg=f"cannot unpack {p['archive']}, nothing was changed: {exc}")
        if os.path.isdir(aside):
            # An earlier restore stopped half-way: what is aside is the store's own data.
            shutil.rmtree(data_dir, ignore_errors=True)
        elif os.path.isdir(data_dir):
            os.rename(data_dir, aside)
        os.rename(incoming, data_dir)
        module.exit_json(changed=True, sha256=checked["sha256"],
                         kept_aside=aside if os.path.isdir(aside) else "")
    if p["state"] == "rolled_back":
        if not os.path.isdir(aside):
            module.exit_json(changed=False)
        shutil.rmtree(data_dir, ignore_errors=True)
        os.rename(aside, data_dir)
        module.exit_json(changed=True)
    changed = os.path.isdir(aside)
    shutil.rmtree(aside, ignore_errors=True)
    module.exit_json(changed=changed)


if __name__ == "__main__":
    main()
