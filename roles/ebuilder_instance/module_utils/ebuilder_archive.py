"""What the backup and restore modules share: checksums, and archives whose members
can only land inside the directory they are unpacked into."""

from __future__ import annotations

import hashlib
import os
import tarfile

# Every archive holds one top directory: the store's data dir, whatever its id.
TOP = "data"
CHUNK = 1 << 20


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_file(archive: str) -> str:
    return archive + ".sha256"


def write_checksum(archive: str, digest: str) -> None:
    """`sha256sum -c` reads it: a sysadmin can check an archive with no provisioner."""
    partial = checksum_file(archive) + ".partial"
    with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        handle.write(f"{digest}  {os.path.basename(archive)}\n")
    os.replace(partial, checksum_file(archive))


def recorded_checksum(archive: str) -> str:
    try:
        with open(checksum_file(archive), encoding="ascii") as handle:
            return handle.read().split()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        return ""


def unsafe_member(member: tarfile.TarInfo) -> str:
    """Why a member could land outside the directory it is unpacked into ("" if safe)."""
    name = member.name
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or parts[0] != TOP:
        return f"{name!r} is outside {TOP}/"
    if member.issym() or member.islnk():
        target = member.linkname
        if target.startswith("/") or ".." in target.split("/"):
            return f"{name!r} links outside the store's data"
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        return f"{name!r} is a device, pipe or other special file"
    return ""


def verify(archive: str, expected: str = "") -> dict:
    """Check the archive end to end before anything is touched: the checksum (the
    recorded one, and `expected` when given), every member readable (gzip's CRC over the
    whole stream) and safe. Raises ValueError saying what is wrong."""
    if not os.path.isfile(archive):
        raise ValueError(f"{archive} does not exist")
    digest = sha256_of(archive)
    recorded = recorded_checksum(archive)
    if expected and digest != expected:
        raise ValueError(f"{archive}: checksum {digest[:12]}… is not the recorded "
                         f"{expected[:12]}… (corrupted or replaced)")
    if recorded and digest != recorded:
        raise ValueError(f"{archive}: checksum does not match {checksum_file(archive)}")
    if not expected and not recorded:
        raise ValueError(f"{archive}: no checksum to verify it against")
    members = 0
    has_db = False
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                problem = unsafe_member(member)
                if problem:
                    raise ValueError(f"{archive}: {problem}")
                if member.isfile():
                    with tar.extractfile(member) as handle:
                        while handle.read(CHUNK):
                            pass
                has_db = has_db or member.name == f"{TOP}/db"
                members += 1
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"{archive} is unreadable: {exc}") from None
    if not has_db:
        raise ValueError(f"{archive} holds no {TOP}/db: not a store's backup")
    return {"sha256": digest, "members": members, "size_bytes": os.path.getsize(archive)}
