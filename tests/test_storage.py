"""onenip_ray.storage on the local filesystem and on a real S3-compatible server (moto)."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from onenip_ray import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """An empty directory: a local path, or a fresh bucket prefix on the moto server."""
    if request.param == "local":
        return str(tmp_path / "root")
    return storage.join(request.getfixturevalue("s3_bucket"), "root")


def _make_tree(path: Path) -> None:
    (path / "sub" / "deeper").mkdir(parents=True)
    (path / "bundle.json").write_text('{"v": 1}')
    (path / "weights.bin").write_bytes(b"\x00\x01" * 100)
    (path / "sub" / "a.txt").write_text("a")
    (path / "sub" / "deeper" / "b.txt").write_text("b")


def test_filesystem_for_local_and_file_uri(tmp_path):
    fs, path = storage.filesystem_for(str(tmp_path / "x"))
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path / "x")
    assert storage.filesystem_for(f"file://{tmp_path}/x")[1] == str(tmp_path / "x")
    assert storage.filesystem_for("relative/y")[1] == os.path.abspath("relative/y")


def test_filesystem_for_s3_uses_env_endpoint_and_caches(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    fs, path = storage.filesystem_for("s3://bucket/key/")
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "bucket/key"
    assert fs.region == "eu-west-1"
    assert storage.filesystem_for("s3://other/k")[0] is fs
    assert storage.filesystem_for("s3://bucket/k", endpoint="http://127.0.0.1:2")[0] is not fs


def test_join():
    assert storage.join("s3://b/", "x/", "/y.png") == "s3://b/x/y.png"
    assert storage.join("/data", "a", "b.png") == "/data/a/b.png"
    assert storage.join("file:///data/", "a") == "file:///data/a"


def test_location_keeps_its_endpoint(monkeypatch):
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = storage.Location("s3://b/", "http://127.0.0.1:2")
    blob = bucket.join("x/", "y.png")
    assert blob == storage.Location("s3://b/x/y.png", "http://127.0.0.1:2")
    assert blob.with_uri("s3://c/z") == storage.Location("s3://c/z", "http://127.0.0.1:2")
    assert blob.filesystem() == storage.filesystem_for("s3://b/x/y.png", "http://127.0.0.1:2")
    assert blob.path == "b/x/y.png"
    assert storage.Location("/data").join("a", "b.png").path == "/data/a/b.png"


def test_bytes_round_trip_and_exists(root):
    uri = storage.join(root, "nested", "blob.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.exists(uri)
    assert not storage.is_dir(uri)
    assert storage.is_dir(storage.join(root, "nested"))
    storage.write_bytes(uri, b"replaced")
    assert storage.read_bytes(uri) == b"replaced"


def test_missing_file_names_the_uri(root):
    storage.write_bytes(storage.join(root, "present.bin"), b"x")
    missing = storage.join(root, "missing.bin")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.read_bytes(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        storage.list_files(storage.join(root, "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        storage.list_dirs(storage.join(root, "nowhere"))


def test_listing(root):
    for name in ["b/2.PNG", "a/1.png", "a/deep/3.jpg", "notes.txt"]:
        storage.write_bytes(storage.join(root, name), b"x")
    files = storage.list_files(root)
    assert files == [
        storage.canonical_uri(storage.join(root, name)) for name in ["a/1.png", "a/deep/3.jpg", "b/2.PNG", "notes.txt"]
    ]
    assert all(f.startswith("s3://") for f in files) or all(os.path.isabs(f) for f in files)
    assert storage.list_files(root, extensions=(".png",), relative=True) == ["a/1.png", "b/2.PNG"]
    assert storage.list_dirs(root) == ["a", "b"]
    assert storage.list_dirs(storage.join(root, "a")) == ["deep"]


def test_commit_and_download_round_trip(root, tmp_path):
    source = tmp_path / "bundle"
    _make_tree(source)
    dest = storage.join(root, "models", "v1")
    storage.commit_dir(str(source), dest, marker="bundle.json")
    assert storage.list_files(dest, relative=True) == ["bundle.json", "sub/a.txt", "sub/deeper/b.txt", "weights.bin"]
    copy = tmp_path / "copy"
    storage.download_dir(dest, str(copy))
    assert (copy / "weights.bin").read_bytes() == b"\x00\x01" * 100
    assert (copy / "sub" / "deeper" / "b.txt").read_text() == "b"


def test_commit_replaces_existing_dir(root, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    _make_tree(first)
    second.mkdir()
    (second / "bundle.json").write_text('{"v": 2}')
    (second / "new.bin").write_bytes(b"new")
    dest = storage.join(root, "bundle")
    storage.commit_dir(str(first), dest, marker="bundle.json")
    storage.commit_dir(str(second), dest, marker="bundle.json")
    assert storage.list_files(dest, relative=True) == ["bundle.json", "new.bin"]
    assert storage.read_bytes(storage.join(dest, "bundle.json")) == b'{"v": 2}'
    if not dest.startswith("s3://"):
        assert sorted(p.name for p in Path(dest).parent.iterdir()) == ["bundle"]


def test_commit_requires_the_marker(root, tmp_path):
    source = tmp_path / "no_marker"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"w")
    with pytest.raises(ValueError, match="bundle.json"):
        storage.commit_dir(str(source), storage.join(root, "x"), marker="bundle.json")
    with pytest.raises(FileNotFoundError, match="absent"):
        storage.commit_dir(str(tmp_path / "absent"), storage.join(root, "x"), marker="bundle.json")


def test_s3_commit_uploads_marker_last(s3_bucket, tmp_path, monkeypatch):
    source = tmp_path / "bundle"
    _make_tree(source)
    uploaded: list[str] = []
    real_upload = storage._upload

    def upload(fs, local, path):
        uploaded.append(path)
        real_upload(fs, local, path)

    monkeypatch.setattr(storage, "_upload", upload)
    storage.commit_dir(str(source), storage.join(s3_bucket, "m"), marker="bundle.json")
    assert len(uploaded) == 4
    assert uploaded[-1].endswith("/m/bundle.json")


def test_write_if_is_a_compare_and_swap(root):
    """Conditional writes: S3 If-None-Match / If-Match on the moto server, locally a lock + rename."""
    pointer = storage.join(root, "CURRENT.json")
    storage.write_if(pointer, b"one", None)  # create: only if absent
    with pytest.raises(storage.PreconditionFailed):
        storage.write_if(pointer, b"other", None)
    data, tag = storage.read_with_tag(pointer)
    assert data == b"one"
    storage.write_if(pointer, b"two", tag)  # the writer that read "one" wins ...
    with pytest.raises(storage.PreconditionFailed):
        storage.write_if(pointer, b"three", tag)  # ... a second one with the same stale tag loses
    assert storage.read_with_tag(pointer)[0] == b"two" == storage.read_bytes(pointer)
    with pytest.raises(FileNotFoundError):
        storage.read_with_tag(storage.join(root, "missing.json"))
    if not pointer.startswith("s3://"):
        assert sorted(os.listdir(root)) == ["CURRENT.json"]  # no lock or temporary left behind
        Path(pointer + ".lock").touch()  # another writer (or a crashed one) holds the lock
        with pytest.raises(storage.PreconditionFailed, match="remove it if none is"):
            storage.write_if(pointer, b"four", storage.read_with_tag(pointer)[1])
