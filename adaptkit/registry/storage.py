"""Where adapter files live: a local folder (the default) or any fsspec URL, e.g. ``s3://bucket/prefix``.

The registry names files by their sha256 and only through :class:`Storage`, so it never cares where bytes live.
Both kinds keep the same promise: a file appears under its final name only when it is complete (local: a temporary
file, then a rename; object stores: one PUT, which is atomic), and every name is proven inside the store's root.

A crash in the middle of a large write to S3 leaves no object, but an unfinished multipart upload: parts the store
keeps (and bills) out of sight. :meth:`Storage.uploads` lists them and :meth:`Storage.discard` aborts one.

Leftovers of a crash are told apart from a write in flight by locks where the file system has them (local: writers
hold a shared ``flock`` on the folder from the first byte to the row's commit; a sweep needs the exclusive lock, which
a killed process no longer blocks) and by age where it has not (object stores: see :attr:`Storage.in_flight_s`).

The interface, its records and its name rules are in :mod:`adaptkit.registry.storebase`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

from adaptkit.artifacts import write_atomic
from adaptkit.errors import RegistryError, param
from adaptkit.registry.storebase import (  # noqa: F401  (_OWN, _PART, _TEMP re-exported from here as before)
    _OWN,
    _PART,
    _TEMP,
    Storage,
    StoredFile,
    Upload,
    check_rel,
    is_own_file,
    is_temp,
)

try:
    import fcntl
except ImportError:  # no flock (Windows): every sweep then waits for leftovers to age, as on an object store
    fcntl = None

__all__ = ["Storage", "LocalStorage", "FsspecStorage", "StoredFile", "Upload", "open_storage", "check_rel",
           "is_own_file", "is_temp"]


class LocalStorage(Storage):
    """A local folder; the default, ``adapters/`` beside a SQLite registry."""

    locks = fcntl is not None

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise RegistryError(f"the adapter folder {self.root} is a file: move it away or pass another adapter "
                                f"folder ({param('adapters')} or $ADAPTKIT_ADAPTERS)")

    def path(self, rel: str) -> Path:
        """The absolute path of ``rel``, proven inside the root (symbolic links resolved)."""
        path = (self.root / check_rel(rel)).resolve()
        if not path.is_relative_to(self.root):
            raise RegistryError(f"adapter file {rel!r} resolves to {path}, outside the adapter folder {self.root}: "
                                "run `adaptkit doctor`")
        return path

    def location(self, rel: str) -> str:
        return str(self.path(rel))

    def local_path(self, rel: str) -> Path:
        return self.path(rel)

    def local_path_root(self) -> Path:
        return self.root

    def put(self, rel: str, data: bytes) -> None:
        try:
            write_atomic(self.path(rel), data)
        except OSError as exc:
            raise _os_error(exc, f"cannot write adapter file into {self.root}") from exc

    def get(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def exists(self, rel: str) -> bool:
        return self.path(rel).is_file()

    def delete(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def files(self) -> list[StoredFile]:
        if not self.root.is_dir():
            return []
        now, out = time.time(), []
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                p = Path(dirpath) / name
                rel = p.relative_to(self.root).as_posix()
                if p.is_symlink():
                    continue
                with contextlib.suppress(FileNotFoundError):  # a writer renamed or removed it meanwhile
                    st = p.stat()
                    out.append(StoredFile(rel, st.st_size, now - st.st_mtime))
        return out

    @contextlib.contextmanager
    def _lock(self, mode: int) -> Iterator[bool]:
        if fcntl is None:
            yield False
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)  # the folder itself: no lock file to sweep
        except OSError as exc:
            raise _os_error(exc, f"cannot use the adapter folder {self.root}") from exc
        try:
            try:
                fcntl.flock(fd, mode)
                got = True
            except BlockingIOError:
                got = False
            yield got
        finally:
            os.close(fd)  # closing releases the lock

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self._lock(fcntl.LOCK_SH if fcntl else 0):
            yield

    @contextlib.contextmanager
    def sweeping(self) -> Iterator[bool]:
        with self._lock(fcntl.LOCK_EX | fcntl.LOCK_NB if fcntl else 0) as got:
            yield got


class FsspecStorage(Storage):
    """Any fsspec file system by URL (``s3://bucket/prefix`` with the ``s3`` extra, ``memory://``, ...).

    Object stores make a PUT visible only when complete, so files are written in one call, never renamed; with no
    locks, a file no row refers to is taken for a crash leftover only once older than :attr:`in_flight_s`.
    """

    def __init__(self, url: str) -> None:
        try:
            import fsspec

            self.fs, root = fsspec.core.url_to_fs(url)
        except ImportError as exc:
            extra = " (pip install 'adaptkit[s3]')" if url.startswith(("s3://", "s3a://")) else ""
            raise RegistryError(f"adapter storage {url} needs a package that is not installed{extra}: "
                                f"{exc}") from exc
        except (ValueError, OSError) as exc:
            raise RegistryError(f"bad adapter storage URL {url!r}: {exc}") from exc
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")

    def _full(self, rel: str) -> str:
        return f"{self.root}/{check_rel(rel)}"

    @contextlib.contextmanager
    def _remote(self, doing: str, missing: bool = True) -> Iterator[None]:
        """A store's failures (network, credentials, bucket) as one RegistryError; with ``missing``, a missing file
        stays a FileNotFoundError for the caller."""
        try:
            yield
        except FileNotFoundError as exc:
            if missing:
                raise
            raise RegistryError(f"adapter store {self.url}: cannot {doing}: {exc} (does the bucket exist?)") from exc
        except Exception as exc:  # each backend has its own exception classes (botocore's are not OSError)
            raise RegistryError(f"adapter store {self.url}: cannot {doing} ({type(exc).__name__}: {exc}); "
                                "check its URL, credentials and endpoint") from exc

    def put(self, rel: str, data: bytes) -> None:
        with self._remote(f"write {rel}", missing=False):
            self.fs.pipe_file(self._full(rel), data)

    def get(self, rel: str) -> bytes:
        with self._remote(f"read {rel}"):
            return self.fs.cat_file(self._full(rel))

    def exists(self, rel: str) -> bool:
        with self._remote(f"look for {rel}"):
            self.fs.invalidate_cache()  # other processes write too: ask the store, not a listing cached earlier
            return self.fs.isfile(self._full(rel))

    def delete(self, rel: str) -> None:
        with self._remote(f"delete {rel}"), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._full(rel))

    def files(self) -> list[StoredFile]:
        now, out = time.time(), []
        self.fs.invalidate_cache()
        try:
            with self._remote("list files"):
                found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return []
        for path, info in found.items():
            rel = path.lstrip("/")[len(self.root.lstrip("/")):].lstrip("/")
            stamp = info.get("LastModified") or info.get("mtime") or info.get("created")
            age = now - (stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp or now))
            out.append(StoredFile(rel, int(info.get("size") or 0), age))
        return out

    def _bucket(self) -> tuple[str, str] | None:
        """(bucket, key prefix) of an S3 store; None for other file systems."""
        if "s3" not in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)):
            return None
        bucket, _, prefix = self.root.lstrip("/").partition("/")
        return bucket, f"{prefix}/" if prefix else ""

    def uploads(self) -> list[Upload]:
        where = self._bucket()
        if where is None:
            return []
        bucket, prefix = where
        now, out, more = time.time(), [], {}
        while True:
            try:
                with self._remote("list unfinished uploads"):
                    page = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **more)
            except FileNotFoundError:  # no bucket: nothing was ever uploaded
                return out
            for u in page.get("Uploads", []):
                with contextlib.suppress(FileNotFoundError):  # completed or aborted meanwhile
                    stamp = max(u["Initiated"], *self._part_times(bucket, u["Key"], u["UploadId"]))
                    out.append(Upload(u["Key"][len(prefix):], u["UploadId"], now - stamp.timestamp()))
            if not page.get("IsTruncated"):
                return out
            more = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def _part_times(self, bucket: str, key: str, upload_id: str) -> list:
        """When each part of an upload arrived: a long upload still sending parts is alive, however old."""
        times, more = [], {}
        while True:
            with self._remote(f"list the parts of {key}"):
                page = self.fs.call_s3("list_parts", Bucket=bucket, Key=key, UploadId=upload_id, **more)
            times += [p["LastModified"] for p in page.get("Parts", [])]
            if not page.get("IsTruncated"):
                return times
            more = {"PartNumberMarker": page["NextPartNumberMarker"]}

    def discard(self, upload: Upload) -> None:
        where = self._bucket()
        if where is not None:
            with self._remote(f"abort the upload of {upload.rel}", missing=False):
                self.fs.call_s3("abort_multipart_upload", Bucket=where[0], Key=where[1] + check_rel(upload.rel),
                                UploadId=upload.id)


def open_storage(location: str | os.PathLike) -> Storage:
    """A :class:`LocalStorage` for a path or ``file://`` URL, an :class:`FsspecStorage` for any other URL."""
    text = os.fspath(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if "://" in text:
        return FsspecStorage(text)
    return LocalStorage(text)


def _os_error(exc: OSError, doing: str) -> RegistryError:
    """One line for the file system's refusals: read-only, full, not a folder, no permission."""
    why = {errno.ENOSPC: "the disk is full: free some space", errno.EDQUOT: "the disk quota is exceeded",
           errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "permission denied", errno.ENOTDIR: "a part of the path is a file, not a folder",
           errno.EFBIG: "the file is too large for this file system or process limit"}.get(exc.errno, exc.strerror)
    return RegistryError(f"{doing}: {why} ({exc.filename or ''})".replace(" ()", ""))
