"""File requests: uploads (chunked, hashed, renamed into place), downloads, listings.

Every path is confined to the work dir and opened component by component without following
symlinks, so user code cannot redirect the root agent through a link.
"""

from __future__ import annotations

import os
import threading

from .core import AgentCore
from .wire import MAX_CHUNK_BYTES, MAX_LIST_ENTRIES, RequestError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .wire import Msg


class FileOps(AgentCore):
    def _parts(self, path: object, *, allow_root: bool) -> list[str]:
        if not isinstance(path, str) or not path or "\x00" in path or len(path) > 4096:
            raise RequestError("invalid_path", "path must be a non-empty string without NUL")
        if path.startswith("/"):
            if path.rstrip("/") == self.workdir:
                rel = ""
            elif path.startswith(self.workdir + "/"):
                rel = path[len(self.workdir) + 1 :]
            else:
                raise RequestError("path_refused", f"{path!r} is outside the work dir {self.workdir}")
        else:
            rel = path
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise RequestError("path_refused", f"{path!r}: '..' is not allowed")
        if not parts and not allow_root:
            raise RequestError("invalid_path", f"{path!r} names the work dir itself")
        return parts

    def _open_dir(self, parts: list[str], create: bool) -> int:
        """Open the directory ``parts`` under the work dir without following any symlink."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts:
                try:
                    nfd = os.open(part, flags, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise RequestError("not_found", f"directory {part!r} does not exist") from None
                    os.mkdir(part, 0o755, dir_fd=fd)
                    self._chown(part, fd)
                    nfd = os.open(part, flags, dir_fd=fd)
                except OSError:
                    raise RequestError(
                        "path_refused", f"{part!r} is not a directory (symlinks are refused)"
                    ) from None
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _chown(self, name: str, dir_fd: int) -> None:
        if self.run_uid is not None:
            os.chown(
                name,
                self.run_uid,
                self.run_gid if self.run_gid is not None else -1,
                dir_fd=dir_fd,
                follow_symlinks=False,
            )

    def resolve_dir(self, path: str) -> str:
        parts = self._parts(path, allow_root=True)
        os.close(self._open_dir(parts, create=False))
        return os.path.join(self.workdir, *parts)

    def op_write_begin(self, req_id: str, msg: Msg) -> None:
        import hashlib

        if self._harden_started:  # the root filesystem may still be growing (see core._harden)
            self.hardened.wait(30)

        size, digest = msg.get("size"), msg.get("sha256")
        if not isinstance(size, int) or size < 0:
            raise RequestError("invalid_request", "size must be a non-negative integer")
        if not isinstance(digest, str) or len(digest) != 64:
            raise RequestError("invalid_request", "sha256 must be 64 hex digits")
        parts = self._parts(msg.get("path"), allow_root=False)
        dfd = self._open_dir(parts[:-1], create=True)
        tmp = f".sbx-upload-{self.next_n()}.part"
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd
            )
        except OSError as exc:
            os.close(dfd)
            raise RequestError("io_error", f"cannot create file: {exc}") from None
        up = {
            "dfd": dfd,
            "fd": fd,
            "tmp": tmp,
            "name": parts[-1],
            "size": size,
            "sha256": digest,
            "got": 0,
            "seq": 0,
            "hash": hashlib.sha256(),
            "exec": bool(msg.get("make_executable")),
        }
        self.uploads[req_id] = up
        if size == 0:
            self._finish_upload(req_id, up)

    def op_write_chunk(self, req_id: str, msg: Msg) -> None:
        import base64
        import binascii
        import hashlib

        up = self.uploads.get(req_id)
        if up is None:
            return  # the upload already failed and was reported; ignore its remaining chunks
        try:
            data = base64.b64decode(msg.get("data", ""), validate=True)
        except (binascii.Error, ValueError, TypeError):
            self._abort_upload(req_id, up, "invalid_request", "chunk data is not base64")
            return
        if msg.get("seq") != up["seq"]:
            self._abort_upload(req_id, up, "invalid_request", f"expected chunk {up['seq']}")
            return
        if hashlib.sha256(data).hexdigest() != msg.get("sha256"):
            self._abort_upload(req_id, up, "checksum_mismatch", f"chunk {up['seq']} sha256 mismatch")
            return
        if up["got"] + len(data) > up["size"] or len(data) > MAX_CHUNK_BYTES:
            self._abort_upload(req_id, up, "invalid_request", "more data than announced")
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(up["fd"], view) :]
        except OSError as exc:
            self._abort_upload(req_id, up, "io_error", f"write failed: {exc}")
            return
        up["hash"].update(data)
        up["got"] += len(data)
        up["seq"] += 1
        if up["got"] == up["size"]:
            self._finish_upload(req_id, up)

    def _abort_upload(self, req_id: str, up: Msg, code: str, message: str, *, reply: bool = True) -> None:
        self.uploads.pop(req_id, None)
        os.close(up["fd"])
        try:
            os.unlink(up["tmp"], dir_fd=up["dfd"])
        except OSError:
            pass
        os.close(up["dfd"])
        if reply:
            self.send({"type": "error", "id": req_id, "code": code, "message": message})

    def _finish_upload(self, req_id: str, up: Msg) -> None:
        digest = up["hash"].hexdigest()
        if digest != up["sha256"].lower():
            self._abort_upload(
                req_id, up, "checksum_mismatch", f"file sha256 {digest} != announced {up['sha256']}"
            )
            return
        try:
            os.fchmod(up["fd"], 0o755 if up["exec"] else 0o644)
            if self.run_uid is not None:
                os.fchown(up["fd"], self.run_uid, self.run_gid if self.run_gid is not None else -1)
            os.rename(up["tmp"], up["name"], src_dir_fd=up["dfd"], dst_dir_fd=up["dfd"])
        except OSError as exc:
            self._abort_upload(req_id, up, "io_error", f"cannot place file: {exc}")
            return
        self.uploads.pop(req_id, None)
        os.close(up["fd"])
        os.close(up["dfd"])
        self.send({"type": "write_result", "id": req_id, "size": up["got"], "sha256": digest})

    def op_read_file(self, req_id: str, msg: Msg) -> None:
        import base64
        import hashlib
        import stat

        chunk_size = msg.get("chunk_size", 1024 * 1024)
        if not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_CHUNK_BYTES:
            raise RequestError("invalid_request", "chunk_size must be 1..2 MiB")
        parts = self._parts(msg.get("path"), allow_root=False)
        dfd = self._open_dir(parts[:-1], create=False)
        try:
            try:
                fd = os.open(
                    parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dfd
                )
            except FileNotFoundError:
                raise RequestError("not_found", f"{msg['path']!r} does not exist") from None
            except OSError as exc:
                raise RequestError("path_refused", f"cannot open {msg['path']!r}: {exc}") from None
        finally:
            os.close(dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RequestError("invalid_path", f"{msg['path']!r} is not a regular file")
            whole = hashlib.sha256()
            seq = offset = 0
            stop = threading.Event()  # set by a cancel: the host gave up (e.g. at its size cap)
            self.register(req_id, stop.set)
            while True:
                if stop.is_set():
                    raise RequestError("cancelled", f"reading {msg['path']!r} was cancelled")
                data = os.read(fd, chunk_size)
                if not data:
                    break
                whole.update(data)
                self.send(
                    {
                        "type": "file_chunk",
                        "id": req_id,
                        "seq": seq,
                        "offset": offset,
                        "data": base64.b64encode(data).decode(),
                        "sha256": hashlib.sha256(data).hexdigest(),
                    }
                )
                seq += 1
                offset += len(data)
        finally:
            self.unregister(req_id)
            os.close(fd)
        self.send(
            {"type": "read_result", "id": req_id, "size": offset, "chunks": seq, "sha256": whole.hexdigest()}
        )

    def op_list_files(self, req_id: str, msg: Msg) -> None:
        parts = self._parts(msg.get("path") or ".", allow_root=True)
        dfd = self._open_dir(parts, create=False)
        entries = []
        try:
            with os.scandir(dfd) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                        is_dir = e.is_dir(follow_symlinks=False)
                    except OSError:
                        continue
                    entries.append(
                        {
                            "name": e.name,
                            "is_dir": is_dir,
                            "is_symlink": e.is_symlink(),
                            "size": 0 if is_dir else st.st_size,
                        }
                    )
        finally:
            os.close(dfd)
        entries.sort(key=lambda x: str(x["name"]))
        kept = entries[:MAX_LIST_ENTRIES]
        reply: dict[str, object] = {"type": "list_result", "id": req_id, "entries": kept}
        if len(entries) > MAX_LIST_ENTRIES:
            reply["truncated"] = len(entries)
        self.send(reply)


