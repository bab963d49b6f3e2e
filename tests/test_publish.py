"""Releases (``onenip publish``): immutable versioned bundles and a pointer moved by conditional writes."""
from __future__ import annotations

import json

import pytest

from onenip_ray import storage
from onenip_ray.bundle import BundleError, read_meta, verify_bundle
from onenip_ray.cli import main
from onenip_ray.formats import BUNDLE_FILE
from onenip_ray.publish import POINTER_FILE, VERSIONS_DIR, publish, read_pointer, resolve_bundle


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "releases")
    return storage.join(request.getfixturevalue("s3_bucket"), "models", "onenip")


def test_first_release_and_idempotent_republish(root, tiny_bundle):
    v1 = read_meta(tiny_bundle)["version"]
    assert resolve_bundle(tiny_bundle) == (tiny_bundle, None)  # a plain bundle is served as it is
    first = publish(tiny_bundle, root)
    assert (first["version"], first["previous"], first["copied"], first["moved"]) == (v1, None, True, True)
    assert resolve_bundle(root) == (storage.join(root, VERSIONS_DIR, v1), root)
    again = publish(tiny_bundle, root)  # idempotent: nothing copied, pointer unchanged
    assert (again["copied"], again["moved"]) == (False, False)


def test_publish_moves_the_pointer_between_immutable_versions(tiny_bundle, tiny_bundle_v2, tmp_path):
    root = str(tmp_path / "releases")  # S3's conditional writes: test_storage.py and the test above
    v1, v2 = publish(tiny_bundle, root)["version"], read_meta(tiny_bundle_v2)["version"]
    assert v1 != v2
    second = publish(tiny_bundle_v2, root)
    assert (second["version"], second["previous"], second["moved"]) == (v2, v1, True)
    pointer, _ = read_pointer(root)
    assert (pointer.version, pointer.bundle, pointer.previous) == (v2, f"{VERSIONS_DIR}/{v2}", v1)
    assert storage.list_dirs(storage.join(root, VERSIONS_DIR)) == sorted([v1, v2])
    assert verify_bundle(storage.join(root, VERSIONS_DIR, v1))["version"] == v1  # the old version is untouched

    bad = tmp_path / "bad"
    storage.commit_dir(tiny_bundle, str(bad), marker=BUNDLE_FILE)
    meta = json.loads((bad / BUNDLE_FILE).read_text())
    meta["calibration"]["target_fpr"] = 0.5
    (bad / BUNDLE_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="does not match the version"):
        publish(str(bad), root)
    assert read_pointer(root)[0].version == v2  # refused before anything moved


def test_publish_cli(tiny_bundle, tmp_path, capsys):
    root = str(tmp_path / "releases")
    assert main(["publish", "--bundle", tiny_bundle, "--root", root]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["moved"] and out["bundle"] == storage.join(root, VERSIONS_DIR, out["version"])
    assert json.loads(storage.read_bytes(storage.join(root, POINTER_FILE)))["version"] == out["version"]
    assert main(["publish", "--bundle", str(tmp_path / "nothing"), "--root", root]) == 2
    assert "not a model bundle" in capsys.readouterr().err
