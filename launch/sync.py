"""Moving files between a laptop and a volume: upload only what changed, download a run's results.

A volume is anything with the four methods of `VolumeStore`. `LocalDirVolume` keeps the
files in a local folder (the tests, and a dry run of the whole flow without an account);
`ModalVolume` adapts a `modal.Volume` (imported lazily: nothing here needs the `modal`
package until a Modal volume is passed in).

Uploads are decided by a manifest, `.dsjax-manifest.json` at the volume's root: the size
and SHA-256 of every file this tool uploaded. A local file is uploaded when the manifest
has no entry for it, when its size or hash differs, or when the volume no longer holds it
at the recorded size. A file the manifest lists under a synced folder that is gone
locally is reported, never deleted from the volume (a run on the volume may still need it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator, Protocol

MANIFEST = ".dsjax-manifest.json"


class VolumeStore(Protocol):
    """The four operations sync needs; paths are POSIX paths relative to the volume's root."""

    def list_files(self, prefix: str) -> dict[str, int]:
        """Every file under `prefix` (recursively) -> its size in bytes; empty when the prefix is absent."""

    def read_bytes(self, path: str) -> bytes | None:
        """A small file's content, or None when it does not exist."""

    def upload(self, files: dict[str, Path | bytes]) -> None:
        """Write each remote path from a local file or bytes, replacing what is there, as one batch."""

    def iter_chunks(self, path: str) -> Iterator[bytes]:
        """A file's content in chunks (for downloads of any size)."""


def _clean(path: str) -> str:
    parts = PurePosixPath("/", path).parts[1:]
    if ".." in parts:
        raise ValueError(f"volume path {path!r} leaves the volume")
    return "/".join(parts)


class LocalDirVolume:
    """A volume kept in a local folder: the same interface, no network."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.uploads = 0  # files written through `upload` (what the tests count)

    def _path(self, path: str) -> Path:
        return self.root / _clean(path)

    def list_files(self, prefix: str) -> dict[str, int]:
        base = self._path(prefix)
        if base.is_file():
            return {_clean(prefix): base.stat().st_size}
        if not base.is_dir():
            return {}
        return {p.relative_to(self.root).as_posix(): p.stat().st_size for p in sorted(base.rglob("*")) if p.is_file()}

    def read_bytes(self, path: str) -> bytes | None:
        try:
            return self._path(path).read_bytes()
        except FileNotFoundError:
            return None

    def upload(self, files: dict[str, Path | bytes]) -> None:
        for remote, source in files.items():
            dest = self._path(remote)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.part")
            if isinstance(source, bytes):
                tmp.write_bytes(source)
            else:
                shutil.copyfile(source, tmp)
            os.replace(tmp, dest)
            self.uploads += 1

    def iter_chunks(self, path: str) -> Iterator[bytes]:
        with open(self._path(path), "rb") as f:
            while chunk := f.read(1 << 22):
                yield chunk


class ModalVolume:
    """`VolumeStore` over a `modal.Volume` (list with `listdir`, write with `batch_upload`, read with `read_file`)."""

    def __init__(self, volume):
        self.volume = volume

    def list_files(self, prefix: str) -> dict[str, int]:
        from modal.exception import NotFoundError

        try:
            entries = self.volume.listdir(_clean(prefix) or "/", recursive=True)
        except (NotFoundError, FileNotFoundError):
            return {}
        # FileEntryType.FILE (its module moved between modal releases; the name did not)
        return {_clean(e.path): e.size for e in entries if getattr(e.type, "name", "") == "FILE"}

    def read_bytes(self, path: str) -> bytes | None:
        from modal.exception import NotFoundError

        try:
            return b"".join(self.volume.read_file(_clean(path)))
        except (NotFoundError, FileNotFoundError):
            return None

    def upload(self, files: dict[str, Path | bytes]) -> None:
        if not files:
            return
        with self.volume.batch_upload(force=True) as batch:
            for remote, source in files.items():
                local = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
                batch.put_file(local, "/" + _clean(remote))

    def iter_chunks(self, path: str) -> Iterator[bytes]:
        yield from self.volume.read_file(_clean(path))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class SyncReport:
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    missing_locally: list[str] = field(default_factory=list)  # on the volume (by the manifest), gone here; kept there

    def summary(self, what: str) -> str:
        text = f"{what}: {len(self.uploaded)} uploaded, {len(self.unchanged)} unchanged"
        if self.missing_locally:
            shown = ", ".join(self.missing_locally[:3]) + (" ..." if len(self.missing_locally) > 3 else "")
            text += f"; {len(self.missing_locally)} no longer here but kept on the volume ({shown})"
        return text


def read_manifest(volume: VolumeStore) -> dict[str, dict]:
    raw = volume.read_bytes(MANIFEST)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}  # an unreadable manifest only costs a full re-upload
    return value if isinstance(value, dict) else {}


def sync_tree(local_dir: Path, remote_prefix: str, volume: VolumeStore) -> SyncReport:
    """Upload the files under `local_dir` to `remote_prefix/` that the volume lacks or holds differently."""
    local_dir, prefix = Path(local_dir), _clean(remote_prefix)
    manifest = read_manifest(volume)
    on_volume = volume.list_files(prefix)
    report, to_upload = SyncReport(), {}
    local_names = set()
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        remote = f"{prefix}/{path.relative_to(local_dir).as_posix()}"
        local_names.add(remote)
        size = path.stat().st_size
        entry = manifest.get(remote)
        # size first (no hashing for a file that obviously changed); the hash catches same-size edits
        same = entry is not None and entry.get("size") == size and on_volume.get(remote) == size
        digest = file_sha256(path)
        if same and entry.get("sha256") == digest:
            report.unchanged.append(remote)
            continue
        to_upload[remote] = path
        manifest[remote] = {"size": size, "sha256": digest}
        report.uploaded.append(remote)
    report.missing_locally = sorted(
        name for name in manifest if name.startswith(prefix + "/") and name not in local_names and name in on_volume
    )
    if to_upload:
        to_upload[MANIFEST] = json.dumps(manifest, indent=1, sort_keys=True).encode()
        volume.upload(to_upload)
    return report


def download_tree(volume: VolumeStore, remote_prefix: str, local_dir: Path) -> list[Path]:
    """Copy every file under `remote_prefix/` into `local_dir` (each written whole, then renamed into place)."""
    prefix, local_dir = _clean(remote_prefix), Path(local_dir)
    written = []
    for remote in sorted(volume.list_files(prefix)):
        dest = local_dir / PurePosixPath(remote).relative_to(prefix)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        with open(tmp, "wb") as f:
            for chunk in volume.iter_chunks(remote):
                f.write(chunk)
        os.replace(tmp, dest)
        written.append(dest)
    return written


def download_folder(volume: VolumeStore, remote_prefix: str, dest: Path) -> Path | None:
    """Replace `dest` with the volume's `remote_prefix/` as a whole (a half-downloaded final/ is never left behind).

    None when the volume holds nothing there.
    """
    dest = Path(dest)
    if not volume.list_files(remote_prefix):
        return None
    tmp = dest.with_name(f".{dest.name}.download")
    shutil.rmtree(tmp, ignore_errors=True)
    download_tree(volume, remote_prefix, tmp)
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest
