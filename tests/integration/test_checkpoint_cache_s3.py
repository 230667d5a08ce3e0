"""The checkpoint cache against object storage (moto's S3 server, the session's `s3_endpoint`).

What broke before: the cache was keyed by file names and sizes, and a retrained adapter of the same rank has
exactly the old sizes, so a warm node kept loading the old weights; `stamp` (which keys evaluation shard
reuse) gave every remote file mtime 0, the same defect. The overwrite below lands within the same second
as the first write, so only the object's ETag can tell the two apart.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from inbol_ray import checkpoint_cache as cc
from inbol_ray.data import io as dio

pytestmark = pytest.mark.integration

BUCKET = "inbol-cache-test"
CKPT = f"s3://{BUCKET}/runs/r/models/cadpo"
WEIGHTS = "adapter/adapter_model.safetensors"


def _files(directory: str) -> set[str]:
    return {str(p.relative_to(directory)) for p in Path(directory).rglob("*") if p.is_file()}


def test_overwritten_checkpoint_is_fetched_again_and_unchanged_one_is_not(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    cache = tmp_path / "cache"
    monkeypatch.setenv(cc.CACHE_ENV, str(cache))  # this test's own cache: its entries are counted
    dio.write_bytes(f"{CKPT}/adapter/adapter_config.json", b'{"r": 8}')
    dio.write_bytes(f"{CKPT}/{WEIGHTS}", b"A" * 4096)
    dio.write_bytes(f"{CKPT}/ray/cadpo-1/checkpoint_000002/optimizer.pt", b"O" * 512)
    dio.write_bytes(f"{CKPT}/tensorboard/events.out.tfevents", b"T" * 128)

    first = cc.local_dir(CKPT)
    assert _files(first) == {"adapter/adapter_config.json", WEIGHTS, cc.MARKER}, "training state was copied"
    assert (Path(first) / WEIGHTS).read_bytes() == b"A" * 4096
    stamp = cc.stamp(CKPT)
    assert all(str(version).startswith("etag:") for _, _, version in stamp), stamp

    copied = (Path(first) / WEIGHTS).stat()
    assert cc.local_dir(CKPT) == first
    again = (Path(first) / WEIGHTS).stat()
    assert (again.st_ino, again.st_mtime_ns) == (copied.st_ino, copied.st_mtime_ns), "copied again"
    assert len(os.listdir(cache)) == 1

    dio.write_bytes(f"{CKPT}/{WEIGHTS}", b"B" * 4096)  # a retrained adapter: same size, other bytes
    assert [size for name, size, _ in cc.stamp(CKPT) if name.endswith(WEIGHTS)] == [4096]
    assert cc.stamp(CKPT) != stamp
    second = cc.local_dir(CKPT)
    assert second != first
    assert (Path(second) / WEIGHTS).read_bytes() == b"B" * 4096
    assert cc.local_dir(CKPT) == second
