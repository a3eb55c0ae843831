"""A package index and an npm registry on 127.0.0.1, serving distributions the test builds.

:class:`LocalIndex` builds tiny pure-Python wheels (zipfile: module, METADATA, WHEEL, RECORD) and
tiny npm tarballs (tar.gz of ``package/``) and serves them from a stdlib ``http.server`` thread as
a PEP 503 simple index (``/simple/<name>/``) and as an npm registry (``/<name>`` packuments,
``/<name>/-/<file>.tgz``). :meth:`LocalIndex.env` is the environment that points the host's pip
and npm at it - and at nothing else: pip's config files are off (``PIP_CONFIG_FILE=/dev/null``) and
npm gets an empty user config and a private cache. Every request is recorded in ``hits``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import threading
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from exec_sandbox import Scheduler, SchedulerConfig
from exec_sandbox.settings import Settings

__all__ = ["LocalIndex", "build_npm_tarball", "build_wheel", "package_scheduler", "serve_index"]


def package_scheduler(caches: Path, *, timeout_s: float = 60.0) -> Scheduler:
    """A TCG Scheduler with private L1 and L2 caches under ``caches``, no warm pool, and one attempt
    per package download (a failure shows at once)."""
    config = SchedulerConfig(default_timeout_seconds=timeout_s, warm_pool_size=0)
    scheduler = Scheduler(
        config, settings=Settings(force_emulation=True), snapshot_dir=caches / "snapshots",
        layer_dir=caches / "layers",
    )
    scheduler.packages.fetch_attempts = 1
    return scheduler


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(
    name: str,
    version: str,
    *,
    code: str | None = None,
    requires: tuple[str, ...] = (),
    tag: str = "py3-none-any",
    console_scripts: Mapping[str, str] | None = None,
) -> tuple[str, bytes]:
    """``(file name, bytes)`` of a wheel with one module ``<name>`` whose ``__version__`` is ``version``
    (and ``console_scripts``, name -> ``module:function``, in its ``entry_points.txt``)."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    files = {
        f"{module}/__init__.py": (code or f"__version__ = {version!r}\n").encode(),
        f"{dist}/METADATA": meta.encode(),
        f"{dist}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n".encode(),
    }
    if console_scripts:
        files[f"{dist}/entry_points.txt"] = (
            "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in console_scripts.items())
        ).encode()
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    files[f"{dist}/RECORD"] = (record + f"{dist}/RECORD,,\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return f"{module}-{version}-{tag}.whl", buf.getvalue()


def build_npm_tarball(
    name: str,
    version: str,
    *,
    main: str,
    dependencies: Mapping[str, str] | None = None,
    scripts: Mapping[str, str] | None = None,
) -> bytes:
    """An npm tarball: ``package/package.json`` and ``package/index.js``."""
    manifest = {
        "name": name,
        "version": version,
        "main": "index.js",
        "dependencies": dict(dependencies or {}),
    }
    if scripts:
        manifest["scripts"] = dict(scripts)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path, data in (
            ("package/package.json", json.dumps(manifest).encode()),
            ("package/index.js", main.encode()),
        ):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class LocalIndex:
    """Routes of the index/registry; start it with :func:`serve_index`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.routes: dict[str, tuple[str, bytes]] = {}
        self.wheels: dict[str, list[tuple[str, bytes]]] = {}
        self.packuments: dict[str, dict[str, object]] = {}
        self.hits: list[str] = []
        self.url = ""

    # ------------------------------------------------------------------ pip

    def add_wheel(self, name: str, version: str, **kwargs: object) -> str:
        """Add a wheel; returns its sha256."""
        filename, data = build_wheel(name, version, **kwargs)  # type: ignore[arg-type]
        self.wheels.setdefault(name, []).append((filename, data))
        self.routes[f"/files/{filename}"] = ("application/octet-stream", data)
        self._index_page(name)
        return hashlib.sha256(data).hexdigest()

    def _index_page(self, name: str) -> None:
        """The PEP 503 page of ``name``: a link per file, with its sha256."""
        links = "".join(
            f'<a href="/files/{fn}#sha256={hashlib.sha256(d).hexdigest()}">{fn}</a>\n'
            for fn, d in self.wheels[name]
        )
        self.routes[f"/simple/{name}/"] = ("text/html", f"<html><body>{links}</body></html>".encode())

    def add_sdist(self, name: str, version: str) -> None:
        """A source distribution only (no wheel): what pip would have to build."""
        data = b"not really a tarball"
        filename = f"{name}-{version}.tar.gz"
        self.wheels.setdefault(name, []).append((filename, data))
        self.routes[f"/files/{filename}"] = ("application/octet-stream", data)
        self._index_page(name)

    # ------------------------------------------------------------------ npm

    def add_npm(
        self,
        name: str,
        version: str,
        *,
        main: str,
        dependencies: Mapping[str, str] | None = None,
        scripts: Mapping[str, str] | None = None,
    ) -> None:
        data = build_npm_tarball(name, version, main=main, dependencies=dependencies, scripts=scripts)
        tgz = f"/{name}/-/{name.split('/')[-1]}-{version}.tgz"
        self.routes[tgz] = ("application/octet-stream", data)
        doc = self.packuments.setdefault(name, {"name": name, "versions": {}, "dist-tags": {}})
        entry: dict[str, object] = {
            "name": name,
            "version": version,
            "dependencies": dict(dependencies or {}),
            "dist": {
                "tarball": f"{self.url}{tgz}",
                "shasum": hashlib.sha1(data).hexdigest(),
                "integrity": "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode(),
            },
        }
        if scripts:
            entry["scripts"] = dict(scripts)
            entry["hasInstallScript"] = True
        doc["versions"][version] = entry  # type: ignore[index]
        doc["dist-tags"] = {"latest": version}
        self.routes[f"/{name}"] = ("application/json", json.dumps(doc).encode())

    # ------------------------------------------------------------------ env

    def env(self) -> dict[str, str]:
        """Environment pointing the host's pip and npm at this server only."""
        npmrc = self.workdir / "npmrc"
        npmrc.write_text("")
        return {
            "PIP_CONFIG_FILE": "/dev/null",
            "PIP_INDEX_URL": f"{self.url}/simple/",
            "PIP_FIND_LINKS": "",
            "PIP_EXTRA_INDEX_URL": "",
            "PIP_CONSTRAINT": "",
            "PIP_RETRIES": "1",
            "PIP_TIMEOUT": "5",
            "PIP_NO_CACHE_DIR": "1",
            "npm_config_registry": f"{self.url}/",
            "npm_config_userconfig": str(npmrc),
            "npm_config_cache": str(self.workdir / "npm-cache"),
            "npm_config_fetch_retries": "0",
            "npm_config_fetch_timeout": "5000",
            "npm_config_audit": "false",
            "npm_config_fund": "false",
            "npm_config_update_notifier": "false",
        }


@contextmanager
def serve_index(index: LocalIndex) -> Iterator[LocalIndex]:
    """Serve ``index`` on 127.0.0.1 (an ephemeral port) for the duration of the block."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            index.hits.append(self.path)
            route = index.routes.get(self.path.split("?")[0].replace("%2f", "/").replace("%2F", "/"))
            if route is None:
                body = b'{"error":"Not found"}'
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
            else:
                ctype, body = route
                self.send_response(200)
                self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    index.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield index
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
