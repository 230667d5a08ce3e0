"""Where a run's driver lease lives (`inbol_ray.run_lease`), and how each change to it is made conditional.

A lease is only as good as "create it if absent" and "replace or delete it if it is still the one I saw".
Each storage offers these differently:

- a local path or `file://` URI (NFS-like shared folders too; needs hard links): the lease is written to a
  temporary file and hard-linked to its name, which fails when the name exists, so a lease is whole the
  moment it is visible. A stale lease is renamed aside and checked to be the one judged stale (its token
  and write serial) before a new one is linked; what was moved by mistake is put back. A renewal replaces
  the file after checking it is still ours: a taker could slip in between only if this holder was already
  a whole `lease_s` late.
- `s3://` with boto3 installed: S3's conditional writes, `put_object(IfNoneMatch="*")` to create and
  `IfMatch=<ETag>` to renew, take over and (`delete_object`) release, so every change is a compare-and-swap
  on the store. boto3 is not a dependency of the project (moto, the tests' S3 server, brings it); it reads
  the endpoint and credentials from the same environment variables pyarrow does (`AWS_ENDPOINT_URL`, ...).
  A store that answers a conditional write with 501 falls back to the read-back store below.
- any other storage (`s3://` without boto3, `gs://`, ...): create when absent, wait `SETTLE_S`, read back,
  and hold the lease only if it still has our token. The race that remains: two drivers that both saw no
  lease, the second writing more than `SETTLE_S` after its look while the first had already read back its
  own write, both start; the one overwritten finds the other's token at its first renewal (within
  `lease_s` / 3) and is stopped (`run_lease`'s `on_lost`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from typing import Any, Protocol

import pyarrow.fs as pafs

from inbol_ray.data import io as dio

LEASE_FILE = ".lease.json"
"""Starts with `.`: every listing of the run skips it (`data.io.list_files`, Parquet discovery)."""
SETTLE_S = 1.0
"""How long the read-back store waits between writing a lease and reading it back."""


class Store(Protocol):
    """Where one lease lives. A `version` names one write of the lease; every change is conditional on it."""

    def read(self) -> tuple[dict[str, Any], str] | None:
        """The lease and its version, or None when there is none."""

    def create(self, body: bytes) -> str | None:
        """Write the lease if there is none; its version, or None when one exists."""

    def renew(self, body: bytes, version: str) -> str | None:
        """Replace the lease if it is still `version` (ours); the new version, or None."""

    def take(self, body: bytes, version: str) -> str | None:
        """Replace a stale lease if it is still `version`; the new version, or None when it changed."""

    def delete(self, version: str) -> bool:
        """Remove the lease if it is still `version`."""


def parse(data: bytes) -> dict[str, Any]:
    """A lease file's record; a file that is no lease (hand-edited, truncated) reads as an unreadable one."""
    try:
        lease = json.loads(data.decode())
        if isinstance(lease, dict) and "token" in lease:
            return lease
    except (UnicodeDecodeError, ValueError):
        pass
    return {"unreadable": True, "token": hashlib.sha256(data).hexdigest(), "serial": 0}


def content_version(lease: dict[str, Any]) -> str:
    """Every write of a lease has a new serial, so (token, serial) names one write."""
    return f"{lease['token']}#{lease.get('serial', 0)}"


class LocalStore:
    """A lease file on a POSIX filesystem: hard links make creation atomic."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.folder = os.path.dirname(path)

    def _read(self, path: str) -> tuple[dict[str, Any], str] | None:
        try:
            with open(path, "rb") as f:
                lease = parse(f.read())
        except FileNotFoundError:
            return None
        return lease, content_version(lease)

    def read(self) -> tuple[dict[str, Any], str] | None:
        return self._read(self.path)

    def _temp(self, body: bytes) -> str:
        tmp = os.path.join(self.folder, f"{LEASE_FILE}.{secrets.token_hex(6)}.tmp")
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, body: bytes) -> str | None:
        tmp = self._temp(body)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)
        return content_version(parse(body))

    def renew(self, body: bytes, version: str) -> str | None:
        found = self.read()
        if found is None or found[1] != version:
            return None
        os.replace(self._temp(body), self.path)
        return content_version(parse(body))

    def _set_aside(self, version: str) -> bool:
        """Move the lease out of the way if it is `version`; put back what was moved if it is not (someone
        renewed or took over between our look and the move)."""
        aside = os.path.join(self.folder, f"{LEASE_FILE}.{secrets.token_hex(6)}.aside")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # gone already: nothing of anyone's is in the way
        moved = self._read(aside)
        if moved is not None and moved[1] != version:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            os.unlink(aside)
            return False
        os.unlink(aside)
        return True

    def take(self, body: bytes, version: str) -> str | None:
        return self.create(body) if self._set_aside(version) else None

    def delete(self, version: str) -> bool:
        return self._set_aside(version)


class ReadBackStore:
    """Any pyarrow filesystem: create when absent, settle, read back (the race left: module docstring)."""

    def __init__(self, uri: str, settle_s: float = SETTLE_S) -> None:
        self.uri, self.settle_s = uri, settle_s

    def read(self) -> tuple[dict[str, Any], str] | None:
        try:
            lease = parse(dio.read_bytes(self.uri))
        except FileNotFoundError:
            return None
        return lease, content_version(lease)

    def _write_and_check(self, body: bytes) -> str | None:
        dio.write_bytes(self.uri, body)
        time.sleep(self.settle_s)
        mine = content_version(parse(body))
        found = self.read()
        return mine if found is not None and found[1] == mine else None

    def create(self, body: bytes) -> str | None:
        return None if dio.exists(self.uri) else self._write_and_check(body)

    def renew(self, body: bytes, version: str) -> str | None:
        found = self.read()
        if found is None or found[1] != version:
            return None
        dio.write_bytes(self.uri, body)
        return content_version(parse(body))

    def take(self, body: bytes, version: str) -> str | None:
        found = self.read()
        if found is not None and found[1] != version:
            return None
        return self._write_and_check(body)

    def delete(self, version: str) -> bool:
        found = self.read()
        if found is None or found[1] != version:
            return False
        dio.remove(self.uri)
        return True


_CHANGED = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404")
"""What S3 answers when the condition failed: someone else's write is there (or nothing is)."""
_UNSUPPORTED = ("NotImplemented", "501")


class S3ConditionalStore:
    """A lease object written with S3's conditional writes; the read-back store where they are missing."""

    def __init__(self, bucket: str, key: str) -> None:
        import boto3

        self.bucket, self.key = bucket, key
        self.client = boto3.client("s3")
        self.fallback: ReadBackStore | None = None

    @staticmethod
    def _code(exc: Exception) -> str:
        return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))

    def read(self) -> tuple[dict[str, Any], str] | None:
        if self.fallback:
            return self.fallback.read()
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            if self._code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        return parse(got["Body"].read()), got["ETag"]

    def _put(self, body: bytes, **condition: str) -> str | None:
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)["ETag"]
        except Exception as exc:
            if self._code(exc) in _CHANGED:
                return None
            raise

    def create(self, body: bytes) -> str | None:
        if self.fallback:
            return self.fallback.create(body)
        try:
            return self._put(body, IfNoneMatch="*")
        except Exception as exc:  # the first write tells whether the store has conditional writes
            if self._code(exc) not in _UNSUPPORTED:
                raise
        self.fallback = ReadBackStore(f"s3://{self.bucket}/{self.key}")
        return self.fallback.create(body)

    def renew(self, body: bytes, version: str) -> str | None:
        return self.fallback.renew(body, version) if self.fallback else self._put(body, IfMatch=version)

    def take(self, body: bytes, version: str) -> str | None:
        return self.fallback.take(body, version) if self.fallback else self._put(body, IfMatch=version)

    def delete(self, version: str) -> bool:
        if self.fallback:
            return self.fallback.delete(version)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)
        except Exception as exc:
            if self._code(exc) in _CHANGED:
                return False
            if self._code(exc) not in _UNSUPPORTED:
                raise
            found = self.read()  # conditional deletes are the newest: look, then delete
            if found is None or found[1] != version:
                return False
            self.client.delete_object(Bucket=self.bucket, Key=self.key)
        return True


def _boto3_installed() -> bool:
    try:
        import boto3  # noqa: F401
    except ImportError:
        return False
    return True


def store_for(run_dir: str, conditional: bool | None = None) -> Store:
    """The lease store of a run directory. `conditional`: S3's conditional writes for `s3://` (None: when
    boto3 is installed; False: the read-back store, e.g. for a store known to lack them)."""
    uri = dio.join(dio.absolute(run_dir), LEASE_FILE)
    fs, path = dio.resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return LocalStore(path)
    if conditional is None:
        conditional = _boto3_installed()
    if conditional and uri.startswith("s3://"):
        bucket, key = path.split("/", 1)
        return S3ConditionalStore(bucket, key)
    return ReadBackStore(uri)
