"""BaseImageManager against a real HTTP server on 127.0.0.1.

The server (http.server in a thread) serves artifacts, hosted manifests by URL,
and an S3 ListObjectsV2-style listing of a fake Firecracker CI bucket with
continuation-token pagination. Nothing here contacts a non-loopback address.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

import pytest

from smartvm.errors import SmartVMError
from smartvm.images import BaseImageManager, ProgressEvent
from smartvm.images.cache import BundleLock

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
CI = "firecracker-ci/v1.10/x86_64/"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeServer:
    """Shared state between the test and the request handler threads."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}  # URL path -> body
        self.behaviour: dict[str, str] = {}  # URL path -> "drop" | "hold" | "500"
        self.bucket: dict[str, bytes] = {}  # S3 key -> body, served under /bucket/
        self.etags: dict[str, str] = {}  # S3 key -> ETag override
        self.page_size = 2
        self.listing_status = 200
        self.release = threading.Event()
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self.base_url = ""

    def count(self, path: str) -> int:
        with self.lock:
            return sum(1 for r in self.requests if urlsplit(r).path == path)

    def listings(self) -> list[dict[str, list[str]]]:
        with self.lock:
            return [parse_qs(urlsplit(r).query) for r in self.requests if "list-type=2" in r]


def _listing(state: FakeServer, query: dict[str, list[str]]) -> bytes:
    prefix = query.get("prefix", [""])[0]
    delimiter = query.get("delimiter", [None])[0]
    start = int(query.get("continuation-token", ["tok-0"])[0].removeprefix("tok-"))
    keys = sorted(k for k in state.bucket if k.startswith(prefix))
    prefixes: list[str] = []
    if delimiter:
        prefixes = sorted({prefix + k[len(prefix):].split(delimiter)[0] + delimiter
                           for k in keys if delimiter in k[len(prefix):]})
        keys = [k for k in keys if delimiter not in k[len(prefix):]]
    page = keys[start:start + state.page_size]
    more = start + state.page_size < len(keys)
    parts = ['<?xml version="1.0" encoding="UTF-8"?>',
             '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
             f"<Name>spec.ccfc.min</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(page)}</KeyCount>",
             f"<MaxKeys>{state.page_size}</MaxKeys><IsTruncated>{'true' if more else 'false'}</IsTruncated>"]
    if more:
        parts.append(f"<NextContinuationToken>tok-{start + state.page_size}</NextContinuationToken>")
    for key in page:
        etag = state.etags.get(key, hashlib.md5(state.bucket[key]).hexdigest())
        parts.append(f"<Contents><Key>{escape(key)}</Key><LastModified>2025-01-01T00:00:00.000Z</LastModified>"
                     f"<ETag>&quot;{etag}&quot;</ETag><Size>{len(state.bucket[key])}</Size>"
                     "<StorageClass>STANDARD</StorageClass></Contents>")
    parts.extend(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in prefixes)
    parts.append("</ListBucketResult>")
    return "".join(parts).encode()


def make_handler(state: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            with state.lock:
                state.requests.append(self.path)
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if url.path in ("/bucket", "/bucket/") and query.get("list-type") == ["2"]:
                if state.listing_status != 200:
                    self._send(state.listing_status, b"<Error><Code>InternalError</Code></Error>")
                    return
                self._send(200, _listing(state, query), content_type="application/xml")
                return
            if url.path.startswith("/bucket/"):
                body = state.bucket.get(unquote(url.path[len("/bucket/"):]))
            else:
                body = state.files.get(url.path)
            behaviour = state.behaviour.get(url.path)
            if body is None or behaviour == "404":
                self._send(404, b"not found")
            elif behaviour == "500":
                self._send(500, b"boom")
            elif behaviour in ("drop", "hold", "hold-once"):
                if behaviour == "hold-once":
                    state.behaviour.pop(url.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                half = len(body) // 2
                self.wfile.write(body[:half])
                self.wfile.flush()
                if behaviour == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                state.release.wait(60)
                self.wfile.write(body[half:])
            else:
                self._send(200, body)

        def _send(self, status: int, body: bytes, content_type: str = "application/octet-stream") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-body is part of several tests


@pytest.fixture
def server() -> Iterator[FakeServer]:
    state = FakeServer()
    httpd = _Server(("127.0.0.1", 0), make_handler(state))
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def hosted(state: FakeServer, bundle_id: str, kernel_bytes: bytes, rootfs_bytes: bytes, **extra: Any) -> str:
    """Publish a hosted manifest with URL artifacts; returns the manifest URL."""
    kernel, rootfs = kernel_bytes, rootfs_bytes
    state.files[f"/{bundle_id}/vmlinux"] = kernel
    state.files[f"/{bundle_id}/rootfs.ext4"] = rootfs
    manifest: dict[str, Any] = {
        "schema_version": 1,
        "bundle_id": bundle_id,
        "arch": "x86_64",
        "firecracker_version": "v1.16.1",
        "rootfs_type": "ext4",
        "kernel": {"url": f"{state.base_url}/{bundle_id}/vmlinux", "sha256": sha(kernel),
                   "size_bytes": len(kernel)},
        "rootfs": {"url": f"{state.base_url}/{bundle_id}/rootfs.ext4", "file_name": "rootfs.ext4",
                   "sha256": sha(rootfs), "size_bytes": len(rootfs)},
    }
    manifest.update(extra)
    state.files[f"/{bundle_id}/manifest.json"] = json.dumps(manifest).encode()
    return f"{state.base_url}/{bundle_id}/manifest.json"


def mgr(tmp_path: Path, state: FakeServer, **kwargs: Any) -> BaseImageManager:
    return BaseImageManager(cache_dir=tmp_path / "cache", arch="x86_64",
                            lts_base_url=f"{state.base_url}/bucket", **kwargs)


def leftovers(tmp_path: Path) -> list[str]:
    root = tmp_path / "cache"
    if not root.exists():
        return []
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.relative_to(root).parts[0] != ".locks"
    )


def read(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def write(path: str | Path, data: bytes) -> None:
    Path(path).write_bytes(data)


def rewrite_last_accessed(bundle_dir: str, stamp: str) -> None:
    path = Path(bundle_dir) / "manifest.json"
    data = json.loads(path.read_text())
    data["last_accessed_at"] = stamp
    path.write_text(json.dumps(data))


# -- hosted manifests by URL -----------------------------------------------------------------


async def test_hosted_manifest_by_url_downloads_verifies_and_reports_progress(
    tmp_path: Path, server: FakeServer
) -> None:
    kernel, rootfs = os.urandom(2 * MIB + 123), os.urandom(1000)
    url = hosted(server, "web-bundle", kernel, rootfs, name="From the web")
    events: list[ProgressEvent] = []
    bundle = await mgr(tmp_path, server, progress=events.append).ensure_base_image("hosted", manifest_url=url)

    assert bundle.preset == "hosted" and bundle.bundle_id == "web-bundle"
    assert bundle.source.type == "hosted-manifest" and bundle.source.manifest_url == url
    assert read(bundle.kernel_image_path) == kernel
    assert read(bundle.rootfs_path) == rootfs
    assert bundle.checksums.kernel_sha256 == sha(kernel)
    assert sorted(leftovers(tmp_path)) == ["web-bundle", "web-bundle/manifest.json", "web-bundle/rootfs.ext4",
                                           "web-bundle/vmlinux"]

    kernel_events = [e for e in events if e.artifact == "kernel"]
    assert kernel_events[0].phase == "start" and kernel_events[0].bytes_done == 0
    assert "progress" in [e.phase for e in kernel_events]
    assert kernel_events[-1].phase == "done"
    assert kernel_events[-1].bytes_done == kernel_events[-1].bytes_total == len(kernel)
    done = [e.bytes_done for e in kernel_events]
    assert done == sorted(done)
    assert all(e.source.startswith(server.base_url) for e in events)

    # Reuse: nothing downloaded again, last_accessed_at refreshed.
    rewrite_last_accessed(bundle.bundle_dir, "2024-01-01T00:00:00.000Z")
    events.clear()
    again = await mgr(tmp_path, server, progress=events.append).ensure_base_image(manifest_url=url)
    assert server.count("/web-bundle/vmlinux") == 1 and server.count("/web-bundle/rootfs.ext4") == 1
    assert again.last_accessed_at.year > 2024
    on_disk = json.loads(read(Path(again.bundle_dir) / "manifest.json"))
    assert on_disk["last_accessed_at"][:4] != "2024"
    assert [e.phase for e in events] == ["cached", "cached"]


async def test_corrupted_download_is_refetched(tmp_path: Path, server: FakeServer) -> None:
    url = hosted(server, "refetch", b"kernel-bytes", b"rootfs-bytes")
    m = mgr(tmp_path, server)
    first = await m.ensure_base_image(manifest_url=url)
    write(first.rootfs_path, b"rootfs-bytez")  # same size, different content
    second = await m.ensure_base_image(manifest_url=url)
    assert read(second.rootfs_path) == b"rootfs-bytes"
    assert server.count("/refetch/rootfs.ext4") == 2
    assert server.count("/refetch/vmlinux") == 1


async def test_sha256_mismatch_leaves_nothing(tmp_path: Path, server: FakeServer) -> None:
    url = hosted(server, "badsum", b"kernel", b"rootfs")
    server.files["/badsum/rootfs.ext4"] = b"rootfX"  # served bytes differ from the manifest's sha256
    with pytest.raises(SmartVMError) as info:
        await mgr(tmp_path, server).ensure_base_image(manifest_url=url)
    assert info.value.code == "BASE_IMAGE_CHECKSUM_MISMATCH"
    assert "sha256" in info.value.message and "/badsum/rootfs.ext4" in info.value.message
    assert leftovers(tmp_path) == []


async def test_size_mismatch(tmp_path: Path, server: FakeServer) -> None:
    url = hosted(server, "badsize", b"kernel", b"rootfs")
    server.files["/badsize/vmlinux"] = b"kernel-but-longer"
    with pytest.raises(SmartVMError) as info:
        await mgr(tmp_path, server).ensure_base_image(manifest_url=url)
    assert info.value.code == "BASE_IMAGE_CHECKSUM_MISMATCH"
    assert "bytes" in info.value.message
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(("behaviour", "status"), [("404", 404), ("500", 500)])
async def test_artifact_http_error(tmp_path: Path, server: FakeServer, behaviour: str, status: int) -> None:
    url = hosted(server, "httperr", b"kernel", b"rootfs")
    server.behaviour["/httperr/rootfs.ext4"] = behaviour
    with pytest.raises(SmartVMError) as info:
        await mgr(tmp_path, server).ensure_base_image(manifest_url=url)
    assert info.value.code == "BASE_IMAGE_DOWNLOAD_FAILED"
    assert info.value.status_code == status
    assert info.value.retryable is (status == 500)
    assert f"HTTP {status}" in info.value.message
    assert leftovers(tmp_path) == []


async def test_connection_dropped_mid_download(tmp_path: Path, server: FakeServer) -> None:
    url = hosted(server, "dropped", os.urandom(64 * 1024), b"rootfs")
    server.behaviour["/dropped/vmlinux"] = "drop"
    with pytest.raises(SmartVMError) as info:
        await mgr(tmp_path, server).ensure_base_image(manifest_url=url)
    assert info.value.code == "BASE_IMAGE_DOWNLOAD_FAILED"
    assert info.value.retryable is True
    assert leftovers(tmp_path) == []


async def test_cancelled_download_leaves_nothing(tmp_path: Path, server: FakeServer) -> None:
    url = hosted(server, "cancelled", os.urandom(3 * MIB), b"rootfs")
    server.behaviour["/cancelled/vmlinux"] = "hold"
    receiving = asyncio.Event()

    def on_progress(event: ProgressEvent) -> None:
        if event.bytes_done > 0:
            receiving.set()

    m = mgr(tmp_path, server, progress=on_progress)
    task = asyncio.create_task(m.ensure_base_image(manifest_url=url))
    await asyncio.wait_for(receiving.wait(), 30)
    part_files = [p for p in (tmp_path / "cache" / "cancelled").iterdir() if p.name.endswith(".part")]
    assert len(part_files) == 1  # the download really was in flight, into a temp file
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftovers(tmp_path) == []
    assert BundleLock(tmp_path / "cache" / ".locks" / "cancelled.lock").try_acquire()


async def test_manifest_url_errors(tmp_path: Path, server: FakeServer) -> None:
    m = mgr(tmp_path, server)
    with pytest.raises(SmartVMError) as info:
        await m.ensure_base_image(manifest_url=f"{server.base_url}/nowhere/manifest.json")
    assert info.value.code == "BASE_IMAGE_MANIFEST_FAILED" and info.value.status_code == 404

    server.files["/bad/manifest.json"] = b'{"schema_version": 1, "bundle_id": '
    with pytest.raises(SmartVMError) as info:
        await m.ensure_base_image(manifest_url=f"{server.base_url}/bad/manifest.json")
    assert info.value.code == "INVALID_BASE_IMAGE_MANIFEST" and "not valid JSON" in info.value.message

    server.files["/huge/manifest.json"] = b" " * (MIB + 1)
    with pytest.raises(SmartVMError) as info:
        await m.ensure_base_image(manifest_url=f"{server.base_url}/huge/manifest.json")
    assert info.value.code == "BASE_IMAGE_MANIFEST_FAILED" and "larger than" in info.value.message

    for field in ("kernel", "arch", "bundle_id"):
        url = hosted(server, f"missing-{field}", b"k", b"r")
        data = json.loads(server.files[f"/missing-{field}/manifest.json"])
        del data[field]
        server.files[f"/missing-{field}/manifest.json"] = json.dumps(data).encode()
        with pytest.raises(SmartVMError) as info:
            await m.ensure_base_image(manifest_url=url)
        assert info.value.code == "INVALID_BASE_IMAGE_MANIFEST" and field in info.value.message
    assert leftovers(tmp_path) == []


async def test_bundle_id_traversal_rejected(tmp_path: Path, server: FakeServer) -> None:
    url = hosted(server, "trav", b"k", b"r")
    data = json.loads(server.files["/trav/manifest.json"])
    data["bundle_id"] = "../../escaped"
    server.files["/trav/manifest.json"] = json.dumps(data).encode()
    with pytest.raises(SmartVMError) as info:
        await mgr(tmp_path, server).ensure_base_image(manifest_url=url)
    assert info.value.code == "INVALID_BASE_IMAGE_MANIFEST" and "bundle_id" in info.value.message
    assert not (tmp_path / "escaped").exists() and leftovers(tmp_path) == []
    assert server.count("/trav/vmlinux") == 0


async def test_relative_path_artifact_in_url_manifest_rejected(tmp_path: Path, server: FakeServer) -> None:
    url = hosted(server, "relpath", b"k", b"r", rootfs={"path": "rootfs.ext4"})
    with pytest.raises(SmartVMError) as info:
        await mgr(tmp_path, server).ensure_base_image(manifest_url=url)
    assert info.value.code == "INVALID_BASE_IMAGE_MANIFEST" and "absolute" in info.value.message
    assert leftovers(tmp_path) == []


async def test_lru_eviction_with_warning(tmp_path: Path, server: FakeServer, caplog: pytest.LogCaptureFixture
                                         ) -> None:
    m = mgr(tmp_path, server, max_stored_base_images=2)
    urls = [hosted(server, n, n.encode() + b"-k", n.encode() + b"-r") for n in ("one", "two", "three")]
    first = await m.ensure_base_image(manifest_url=urls[0])
    second = await m.ensure_base_image(manifest_url=urls[1])
    rewrite_last_accessed(first.bundle_dir, "2024-01-01T00:00:00.000Z")
    rewrite_last_accessed(second.bundle_dir, "2024-02-01T00:00:00.000Z")
    with caplog.at_level(logging.WARNING):
        await m.ensure_base_image(manifest_url=urls[2])
    assert [b.bundle_id for b in await m.list_base_images()] == ["three", "two"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "Evicting old base image bundle one" in warnings[0]


# -- two processes ensuring the same bundle ----------------------------------------------------

CHILD = """
import asyncio, json, sys
from smartvm.images import BaseImageManager

async def main() -> None:
    manager = BaseImageManager(cache_dir=sys.argv[1], arch="x86_64", lts_base_url="http://127.0.0.1:9")
    bundle = await manager.ensure_base_image(manifest_url=sys.argv[2])
    print(json.dumps({"bundle_id": bundle.bundle_id, "kernel": bundle.checksums.kernel_sha256,
                      "rootfs": bundle.checksums.rootfs_sha256}))

asyncio.run(main())
"""


async def test_two_processes_ensure_the_same_bundle(tmp_path: Path, server: FakeServer) -> None:
    kernel, rootfs = os.urandom(512 * 1024), os.urandom(256 * 1024)
    url = hosted(server, "shared", kernel, rootfs)
    server.behaviour["/shared/vmlinux"] = "hold-once"
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, str(tmp_path / "cache"), url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        # Hold the first kernel download until both processes have read the manifest, so the
        # second one reaches the bundle lock while the first is mid-download.
        for _ in range(2400):
            if server.count("/shared/manifest.json") == 2 and server.count("/shared/vmlinux") == 1:
                break
            await asyncio.sleep(0.05)
        assert server.count("/shared/manifest.json") == 2
        assert not BundleLock(tmp_path / "cache" / ".locks" / "shared.lock").try_acquire()
        server.release.set()
        results = [await asyncio.wait_for(p.communicate(), 120) for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err.decode()
    outputs = [json.loads(out) for out, _ in results]
    assert outputs[0] == outputs[1] == {"bundle_id": "shared", "kernel": sha(kernel), "rootfs": sha(rootfs)}
    # The second process waited for the lock and reused the verified files.
    assert server.count("/shared/vmlinux") == 1 and server.count("/shared/rootfs.ext4") == 1
    assert leftovers(tmp_path) == ["shared", "shared/manifest.json", "shared/rootfs.ext4", "shared/vmlinux"]
    assert read(tmp_path / "cache" / "shared" / "vmlinux") == kernel


# -- the lts preset against a fake CI bucket ----------------------------------------------------


def fill_bucket(state: FakeServer) -> dict[str, bytes]:
    objects = {
        CI + "vmlinux-5.10.239": b"old kernel",
        CI + "vmlinux-6.1.9": b"kernel 6.1.9",
        CI + "vmlinux-6.1.10": b"kernel 6.1.10",
        CI + "vmlinux-6.1.10.config": b"config",
        CI + "ubuntu-22.04.ext4": b"ubuntu ext4 rootfs",
        CI + "ubuntu-22.04.id_rsa": b"key",
        CI + "ubuntu-24.04.squashfs": b"ubuntu squashfs",
        "firecracker-ci/v1.9/x86_64/vmlinux-6.1.1": b"older line",
        "firecracker-ci/v1.9/x86_64/ubuntu-22.04.ext4": b"older rootfs",
        "firecracker-ci/v1.10/aarch64/vmlinux-6.1.99": b"arm kernel",
    }
    state.bucket.update(objects)
    return objects


async def test_lts_lists_with_pagination_and_picks_newest(tmp_path: Path, server: FakeServer) -> None:
    fill_bucket(server)
    bundle = await mgr(tmp_path, server).ensure_base_image("lts", ci_version="v1.10")
    assert bundle.preset == "lts" and bundle.ci_version == "v1.10" and bundle.firecracker_version == "v1.10.0"
    assert bundle.bundle_id == "lts-v1.10-x86_64-vmlinux-6.1.10-ubuntu-22.04-ext4"
    assert read(bundle.kernel_image_path) == b"kernel 6.1.10"
    assert read(bundle.rootfs_path) == b"ubuntu ext4 rootfs"
    assert Path(bundle.rootfs_path).name == "rootfs.ext4" and not bundle.rootfs_is_read_only
    assert bundle.source.type == "firecracker-ci"
    assert bundle.source.kernel_key == CI + "vmlinux-6.1.10"
    assert bundle.source.bucket_url == f"{server.base_url}/bucket"
    assert bundle.checksums.rootfs_sha256 == sha(b"ubuntu ext4 rootfs")
    listings = server.listings()
    assert all(q["prefix"] == [CI] for q in listings)
    assert len(listings) == 4  # 7 keys, 2 per page
    assert [q.get("continuation-token") for q in listings] == [None, ["tok-2"], ["tok-4"], ["tok-6"]]

    # Cached reuse lists again but downloads nothing.
    again = await mgr(tmp_path, server).ensure_base_image(ci_version="v1.10")
    assert again.bundle_id == bundle.bundle_id
    assert server.count(f"/bucket/{CI}vmlinux-6.1.10") == 1


async def test_lts_discovers_newest_ci_line(tmp_path: Path, server: FakeServer) -> None:
    fill_bucket(server)
    bundle = await mgr(tmp_path, server).ensure_base_image()
    assert bundle.ci_version == "v1.10"  # numerically newer than v1.9
    first = server.listings()[0]
    assert first["prefix"] == ["firecracker-ci/"] and first["delimiter"] == ["/"]


async def test_lts_squashfs_only(tmp_path: Path, server: FakeServer) -> None:
    objects = fill_bucket(server)
    del server.bucket[CI + "ubuntu-22.04.ext4"]
    bundle = await mgr(tmp_path, server).ensure_base_image(ci_version="v1.10")
    assert bundle.rootfs_type == "squashfs" and bundle.rootfs_is_read_only
    assert Path(bundle.rootfs_path).name == "rootfs.squashfs"
    assert read(bundle.rootfs_path) == objects[CI + "ubuntu-24.04.squashfs"]


async def test_lts_etag_md5_mismatch(tmp_path: Path, server: FakeServer) -> None:
    fill_bucket(server)
    server.etags[CI + "ubuntu-22.04.ext4"] = "0" * 32
    with pytest.raises(SmartVMError) as info:
        await mgr(tmp_path, server).ensure_base_image(ci_version="v1.10")
    assert info.value.code == "BASE_IMAGE_CHECKSUM_MISMATCH" and "md5" in info.value.message
    assert leftovers(tmp_path) == []


async def test_lts_missing_artifacts_and_bad_listing(tmp_path: Path, server: FakeServer) -> None:
    m = mgr(tmp_path, server)
    with pytest.raises(SmartVMError) as info:
        await m.ensure_base_image(ci_version="v1.10")
    assert info.value.code == "BASE_IMAGE_NOT_FOUND" and "vmlinux" in info.value.message
    server.listing_status = 500
    with pytest.raises(SmartVMError) as info:
        await m.ensure_base_image(ci_version="v1.10")
    assert info.value.code == "BASE_IMAGE_MANIFEST_FAILED" and info.value.status_code == 500
    assert leftovers(tmp_path) == []


async def test_lts_listing_failure_falls_back_to_cache(
    tmp_path: Path, server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    fill_bucket(server)
    m = mgr(tmp_path, server)
    cached = await m.ensure_base_image(ci_version="v1.10")
    server.listing_status = 500
    with caplog.at_level(logging.WARNING):
        again = await m.ensure_base_image(ci_version="v1.10")
    assert again.bundle_id == cached.bundle_id and again.checksums == cached.checksums
    assert any("listing failed" in r.getMessage() for r in caplog.records)
    with pytest.raises(SmartVMError) as info:
        await m.ensure_base_image(ci_version="v1.9")  # nothing cached for that line
    assert info.value.code == "BASE_IMAGE_MANIFEST_FAILED"

