"""Publishing a directory atomically, with a manifest that proves it complete; and verifying it on load.

Every directory this project writes (a model, an adapter, a training checkpoint, the reference-log-prob cache)
goes through `publish_directory`:

    with publish_directory(final) as staging:   # a fresh temporary sibling, .<name>.tmp-XXXX
        save_file(tensors, staging / "weights.safetensors")
        ...
    # on leaving the block: every file fsync'ed, then manifest.json written LAST (size and sha256 of each file),
    # the directory fsync'ed and renamed onto `final` (atomic within one filesystem), the parent fsync'ed

So at any instant, a SIGKILL or a full disk included, `final` is either absent (or the previous version), or
complete with a manifest that lists every file; a manifest that exists was written after everything it names
was on disk. An error inside the block (ENOSPC, EACCES, ...) deletes the staging directory and re-raises: the
previous `final` is untouched. `verify_directory` recomputes sizes and hashes against the manifest and names
the first file that differs, is missing or was cut short.

Directories written by other tools (HF transformers, PEFT) have no manifest; loaders accept them unverified
(`required=False`) and say nothing, since there is nothing to check against.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "spl-manifest-1"


class IntegrityError(ValueError):
    """A published directory whose files do not match its manifest (or that has none where one is required).
    The message starts with the offending path; callers re-raise it as their own error type."""


def file_sha256(path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's contents (a directory: its entries, i.e. renames into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ordinary_permissions(directory: Path) -> None:
    """mkdtemp makes 0700 and safetensors may write 0600: give the published tree the modes a plain mkdir/open
    have under the process umask, so that a saved model or adapter can be served by other users."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(directory):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _files(directory: Path) -> list[str]:
    """Relative POSIX paths of every regular file under `directory`, sorted (the manifest's own excluded)."""
    found = []
    for root, _, files in os.walk(directory):
        for name in files:
            relative = Path(root, name).relative_to(directory).as_posix()
            if relative != MANIFEST:
                found.append(relative)
    return sorted(found)


def write_manifest(directory: Path) -> dict:
    """fsync every file under `directory`, then write manifest.json (sizes and sha256) and fsync it."""
    entries = {}
    for relative in _files(directory):
        path = directory / relative
        _fsync(path)
        entries[relative] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"format": MANIFEST_FORMAT, "files": entries}
    with open(directory / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return manifest


@contextlib.contextmanager
def publish_directory(final, overwrite: bool = False):
    """Yield a temporary sibling of `final` to write into; on a clean exit, manifest it and rename it onto
    `final`. An existing `final` is an error (FileExistsError) unless `overwrite`: then it is moved aside first
    and put back if the rename fails, and deleted once the new one is in place. On an exception the staging
    directory is removed and the exception re-raised; `final` is as it was."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final}: already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield staging
        write_manifest(staging)
        _ordinary_permissions(staging)
        _fsync(staging)
        if final.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, aside / final.name)
            try:
                os.replace(staging, final)
            except BaseException:
                os.replace(aside / final.name, final)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, final)
        _fsync(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def is_staging(path) -> bool:
    """Whether `path` is a leftover of an interrupted publish_directory (safe to delete)."""
    name = Path(path).name
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


def read_manifest(directory) -> dict | None:
    """The manifest of `directory` ({"format", "files": {path: {"size", "sha256"}}}), or None if it has none.
    IntegrityError if it exists but is not a manifest (cut short, edited, or some other file)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, RecursionError) as error:
        raise IntegrityError(f"{path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict):
        manifest = {}
    files = manifest.get("files")
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()):
        raise IntegrityError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    for relative in files:
        if relative.startswith("/") or ".." in Path(relative).parts:  # a manifest must not point outside
            raise IntegrityError(f"{path}: lists {relative!r}, outside the directory")
    return manifest


def verify_directory(directory, required: bool = True, hash_limit: int | None = None) -> bool:
    """Check every file the manifest lists: present, the recorded size, the recorded sha256. Returns True if
    a manifest was checked, False if there is none and `required` is False; raises IntegrityError naming the
    first bad file otherwise. Files the manifest does not list are not checked. hash_limit: skip hashing (sizes
    only) when the listed files total more bytes than this (a 14 GB model would take ~15 s to hash)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        if required:
            raise IntegrityError(f"{directory / MANIFEST}: missing (the directory was never completely written)")
        return False
    files = manifest["files"]
    hashing = hash_limit is None or sum(e["size"] for e in files.values()) <= hash_limit
    for relative, entry in sorted(files.items()):
        path = directory / relative
        if not path.is_file():
            raise IntegrityError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != entry["size"]:
            raise IntegrityError(f"{path}: {size} bytes, {MANIFEST} says {entry['size']} (truncated or replaced)")
        if hashing and file_sha256(path) != entry["sha256"]:
            raise IntegrityError(f"{path}: sha256 differs from {MANIFEST} (corrupted or modified)")
    return True


def write_file_atomic(path, data: bytes | str) -> None:
    """Write one file through a temporary sibling, fsync and rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    _fsync(path.parent)


def write_json_atomic(path, value) -> None:
    """`value` as indented JSON, atomically (write_file_atomic)."""
    write_file_atomic(path, json.dumps(value, indent=2) + "\n")
