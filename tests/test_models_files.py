"""models/files.py: atomic publish with a manifest written last, and verification against it.

Oracles: invariants and hashlib. A published directory's manifest lists every file with the size os.stat gives
and the sha256 hashlib computes over its bytes; a directory damaged in any way (cut short, one bit flipped, a
file removed, the manifest removed or mangled) fails verification naming the damaged path; a publish that
fails midway (a write raising ENOSPC) leaves the previous version byte for byte and no staging directory.
"""
import errno
import hashlib
import json
import os

import pytest

from models.files import (MANIFEST, IntegrityError, is_staging, publish_directory, read_manifest, verify_directory,
                          write_json_atomic)


def publish(path, files, overwrite=False):
    with publish_directory(path, overwrite=overwrite) as staging:
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
    return path


def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    files = {"a.bin": b"\x00" * 1000, "b.json": b'{"x": 1}', "sub/c.txt": b"hello"}
    path = publish(tmp_path / "out", files)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["files"] == {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                                 for name, data in files.items()}
    assert verify_directory(path) is True
    assert os.listdir(tmp_path) == ["out"]  # no staging directory left


@pytest.mark.parametrize("damage, named", [
    ("truncate", "a.bin: 500 bytes, manifest.json says 1000"),
    ("flip", "a.bin: sha256 differs"),
    ("remove", "a.bin: missing (listed in manifest.json)"),
    ("no-manifest", "manifest.json: missing"),
    ("mangled-manifest", "manifest.json: unreadable manifest"),
    ("foreign-manifest", "manifest.json: not a spl-manifest-1 manifest"),
    ("escaping-manifest", "lists '../x', outside the directory"),
])
def test_any_damage_is_named(tmp_path, damage, named):
    path = publish(tmp_path / "out", {"a.bin": bytes(range(250)) * 4, "b.txt": b"b"})
    target = path / "a.bin"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:500])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[321] ^= 0x10
        target.write_bytes(bytes(data))
    elif damage == "remove":
        target.unlink()
    elif damage == "no-manifest":
        (path / MANIFEST).unlink()
    elif damage == "mangled-manifest":
        (path / MANIFEST).write_text('{"format": "spl-manifest-1", "files": {')
    elif damage == "foreign-manifest":
        (path / MANIFEST).write_text('{"files": []}')
    else:
        manifest = json.loads((path / MANIFEST).read_text())
        manifest["files"]["../x"] = {"size": 1, "sha256": "0" * 64}
        (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError) as error:
        verify_directory(path)
    assert named in str(error.value) and str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_directory_without_manifest_is_accepted_only_when_not_required(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert verify_directory(tmp_path / "hf", required=False) is False
    assert read_manifest(tmp_path / "hf") is None
    with pytest.raises(IntegrityError, match="never completely written"):
        verify_directory(tmp_path / "hf")


def test_hash_limit_checks_sizes_only_above_it(tmp_path):
    path = publish(tmp_path / "out", {"a.bin": b"abcd" * 100})
    (path / "a.bin").write_bytes(b"abce" * 100)  # same size, other bytes
    assert verify_directory(path, hash_limit=100) is True  # 400 bytes > 100: sizes only
    with pytest.raises(IntegrityError, match="sha256 differs"):
        verify_directory(path, hash_limit=400)


def test_existing_target_is_refused_or_replaced_whole(tmp_path):
    path = publish(tmp_path / "out", {"old.txt": b"old"})
    with pytest.raises(FileExistsError):
        publish(path, {"new.txt": b"new"})
    assert snapshot(path) == {"old.txt": b"old", MANIFEST: (path / MANIFEST).read_bytes()}
    publish(path, {"new.txt": b"new"}, overwrite=True)
    assert sorted(snapshot(path)) == [MANIFEST, "new.txt"] and verify_directory(path)
    assert os.listdir(tmp_path) == ["out"]


def test_failing_write_keeps_the_previous_version(tmp_path, monkeypatch):
    """A write that raises ENOSPC midway (after one file is staged) re-raises, removes the staging directory and
    leaves the previous version exactly as it was; so does an exception raised by the caller inside the block."""
    path = publish(tmp_path / "out", {"a.bin": b"version 1"})
    before = snapshot(path)
    real_write_manifest = __import__("models.files", fromlist=["write_manifest"]).write_manifest

    def full_disk(directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("models.files.write_manifest", full_disk)
    with pytest.raises(OSError) as error:
        publish(path, {"a.bin": b"version 2"}, overwrite=True)
    assert error.value.errno == errno.ENOSPC
    assert snapshot(path) == before and os.listdir(tmp_path) == ["out"]
    monkeypatch.setattr("models.files.write_manifest", real_write_manifest)
    with pytest.raises(RuntimeError):
        with publish_directory(path, overwrite=True) as staging:
            (staging / "a.bin").write_bytes(b"version 3")
            raise RuntimeError("caller failed")
    assert snapshot(path) == before and os.listdir(tmp_path) == ["out"]


def test_published_files_get_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = publish(tmp_path / "out", {"a.bin": b"x", "sub/b.bin": b"y"})
    finally:
        os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o755
    assert {os.stat(p).st_mode & 0o777 for p in path.rglob("*") if p.is_file()} == {0o644}


def test_staging_names_are_recognised(tmp_path):
    seen = []
    with publish_directory(tmp_path / "out") as staging:
        seen.append(staging)
        assert is_staging(staging) and staging.parent == tmp_path
    assert not is_staging(tmp_path / "out")


def test_write_json_atomic_leaves_no_temporary(tmp_path):
    write_json_atomic(tmp_path / "c.json", {"a": 1})
    write_json_atomic(tmp_path / "c.json", {"a": 2})
    assert json.loads((tmp_path / "c.json").read_text()) == {"a": 2} and os.listdir(tmp_path) == ["c.json"]
