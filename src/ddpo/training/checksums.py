"""Checksums of checkpoint directories: a resume can tell a whole checkpoint from a damaged one.

`write_checksums(directory)` records the SHA-256 and size of every file of a freshly written checkpoint in
`directory/checksums.json` (the last file written, before the directory is renamed into place);
`checkpoint_problem(directory)` re-reads them and names the first file that is missing, resized or altered.
A checkpoint written before checksums existed has no `checksums.json`; it is taken as whole (its loading can
still fail, and the trainer then treats it as damaged).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CHECKSUMS = "checksums.json"
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(directory: Path) -> None:
    """directory/checksums.json: {"sha256": {relative path: hex}, "bytes": {relative path: size}}."""
    files = _files(directory)
    record = {
        "sha256": {p.relative_to(directory).as_posix(): file_sha256(p) for p in files},
        "bytes": {p.relative_to(directory).as_posix(): p.stat().st_size for p in files},
    }
    with (directory / CHECKSUMS).open("w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=1, sort_keys=True) + "\n")
        f.flush()


def checkpoint_problem(directory: Path) -> str | None:
    """What is wrong with a checkpoint directory, or None when every file matches its recorded checksum."""
    listing = directory / CHECKSUMS
    if not listing.is_file():
        return None  # written before checksums existed
    try:
        record = json.loads(listing.read_text(encoding="utf-8"))
        sha256, sizes = record["sha256"], record["bytes"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{CHECKSUMS} is unreadable ({type(error).__name__})"
    for name, expected in sorted(sha256.items()):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != sizes.get(name):
            return f"{name} has {path.stat().st_size} bytes, {sizes.get(name)} were written"
        if file_sha256(path) != expected:
            return f"{name} does not match its checksum"
    return None
