"""NvmeAdapter: the local-disk tier. Parallel chunked `os.preadv` from a thread pool straight into the caller's
page-aligned buffer, with O_DIRECT so reads neither pollute nor depend on the page cache — what a cache tier
needs to measure and to get from an NVMe device (queue depth comes from the parallel chunks).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .base import ObjectInfo, as_u8, read_fresh
from .buffers import PAGE
from .errors import BlobNotFound, TierAccessError

log = logging.getLogger(__name__)
_XATTR = "user.moe."


class NvmeAdapter:
    def __init__(self, root: str, *, tier: str = "nvme", chunk_bytes: int = 4 << 20, parallelism: int = 8,
                 o_direct: bool = True):
        assert chunk_bytes % PAGE == 0, f"chunk_bytes must be a multiple of {PAGE}, got {chunk_bytes}"
        self.root, self.tier, self.uri = os.path.abspath(root), tier, "file://" + os.path.abspath(root)
        self.chunk_bytes, self.parallelism = chunk_bytes, parallelism
        self._pool = ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix=f"{tier}-io")
        self._direct = o_direct and hasattr(os, "O_DIRECT")

    def path(self, key: str) -> str:
        p = os.path.normpath(os.path.join(self.root, key))
        if not p.startswith(self.root + os.sep):
            raise ValueError(f"key {key!r} escapes the tier root {self.root}")
        return p

    # -- reads ----------------------------------------------------------------------------------------------------
    def _open(self, key: str, direct: bool) -> int:
        path = self.path(key)
        try:
            return os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        except FileNotFoundError as e:
            raise BlobNotFound(f"tier {self.tier!r}: {path} does not exist") from e
        except OSError as e:
            if direct and e.errno == errno.EINVAL:  # filesystem without O_DIRECT (tmpfs, some overlays)
                raise
            raise TierAccessError(f"tier {self.tier!r}: cannot open {path}: {e.strerror}") from e

    def _open_for_read(self, key: str) -> tuple[int, bool]:
        if self._direct:
            try:
                return self._open(key, True), True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._direct = False
                log.warning("tier %r: O_DIRECT not supported under %s; using buffered reads", self.tier, self.root)
        return self._open(key, False), False

    @staticmethod
    def _pread(fd: int, view: memoryview, offset: int) -> int:
        done = 0
        while done < len(view):  # preadv may return short counts (signals, page-cache limits)
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    async def read_into(self, key: str, out, offset: int = 0) -> int:
        mv = as_u8(out)
        total = len(mv)
        fd, direct = self._open_for_read(key)
        fd_buf = None
        closes_later = False
        try:
            size = os.fstat(fd).st_size
            if offset + total > size:
                raise TierAccessError(f"tier {self.tier!r}: {self.path(key)} holds {size} bytes, asked for "
                                      f"[{offset}, {offset + total}); the file is truncated")
            addr = np.frombuffer(mv, np.uint8).ctypes.data if total else 0
            # O_DIRECT needs buffer address, file offset and length aligned; the unaligned tail goes buffered.
            body = total - total % PAGE if direct and addr % PAGE == 0 and offset % PAGE == 0 else 0
            if body < total:   # opened before any chunk is in flight: a failed open closes no descriptor in use
                fd_buf = self._open(key, False)
            cfs = [self._pool.submit(self._pread, fd, mv[s:min(s + self.chunk_bytes, body)], offset + s)
                   for s in range(0, body, self.chunk_bytes)]
            if body < total:
                cfs += [self._pool.submit(self._pread, fd_buf, mv[s:min(s + self.chunk_bytes, total)], offset + s)
                        for s in range(body, total, self.chunk_bytes)]
            # Wait for every chunk, failed or not, before closing: a thread still in preadv on a closed (and
            # possibly reused) descriptor would read another file's bytes into the caller's buffer.
            gathered = asyncio.gather(*(asyncio.wrap_future(f) for f in cfs), return_exceptions=True)
            try:
                results = await asyncio.shield(gathered)
            except asyncio.CancelledError:   # the caller gave up: chunks not started never read, and the
                for f in cfs:                # descriptors close once the running ones are done, not now
                    f.cancel()
                _close_after(cfs, [fd] + ([fd_buf] if fd_buf is not None else []))
                closes_later = True
                raise
            errs = [r for r in results if isinstance(r, BaseException)]
            if errs:
                e = errs[0]
                if isinstance(e, OSError):
                    raise TierAccessError(f"tier {self.tier!r}: cannot read {self.path(key)}: "
                                          f"{e.strerror or e}") from e
                raise e
            got = sum(results)
        finally:
            if not closes_later:
                os.close(fd)
                if fd_buf is not None:
                    os.close(fd_buf)
        if got != total:
            raise TierAccessError(f"tier {self.tier!r}: short read of {self.path(key)}: {got} of {total} bytes")
        return got

    async def read(self, key: str, offset: int = 0, length: int | None = None) -> np.ndarray:
        return await read_fresh(self, key, offset, length, self.path(key))

    async def stat(self, key: str) -> ObjectInfo | None:
        path = self.path(key)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TierAccessError(f"tier {self.tier!r}: cannot stat {path}: {e.strerror}") from e
        md = {}
        try:
            for name in os.listxattr(path):
                if name.startswith(_XATTR):
                    md[name[len(_XATTR):]] = os.getxattr(path, name).decode()
        except OSError:
            pass  # filesystem without user xattrs: callers fall back to reading and verifying
        return ObjectInfo(st.st_size, md)

    async def exists(self, key: str) -> bool:
        return await self.stat(key) is not None

    # -- writes: temp file + fsync + rename, so a crash never leaves a partial object under its real name --------
    def _write_sync(self, key: str, data=None, src: str | None = None, metadata=None) -> None:
        path = self.path(key)
        d = os.path.dirname(path)
        tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            os.makedirs(d, exist_ok=True)
            with open(tmp, "wb") as f:
                if src is None:
                    f.write(memoryview(data).cast("B") if not isinstance(data, bytes) else data)
                else:
                    with open(src, "rb") as s:
                        while chunk := s.read(8 << 20):
                            f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            done = []
            for k, v in (metadata or {}).items():
                try:
                    os.setxattr(tmp, _XATTR + k, v.encode())
                    done.append(k)
                except OSError:  # no user xattrs here: store none rather than a misleading subset
                    for k2 in done:
                        try:
                            os.removexattr(tmp, _XATTR + k2)
                        except OSError:
                            pass
                    break
            os.replace(tmp, path)
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except BaseException as e:
            try:  # a failed write leaves neither a partial object nor its temp file behind
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise TierAccessError(f"tier {self.tier!r}: cannot write {path}: {e.strerror}") from e
            raise

    async def write(self, key: str, data, metadata: dict[str, str] | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._write_sync, key, data, None, metadata)

    async def write_file(self, key: str, path: str, metadata: dict[str, str] | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._write_sync, key, None, path, metadata)

    async def delete(self, key: str) -> None:
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            pass

    def list_tmp(self) -> list[str]:
        """Leftover temp files of interrupted writes (a re-run of the conversion removes them)."""
        out = []
        for d, _, files in os.walk(self.root):
            out += [os.path.join(d, f) for f in files if ".tmp-" in f]
        return out

    async def close(self) -> None:
        self._pool.shutdown(wait=False)


def _close_after(futures: list, fds: list[int]) -> None:
    """Close fds once every future is done, from whichever thread finishes last (not the event loop, which may be
    gone by then)."""
    if not futures:
        for x in fds:
            os.close(x)
        return
    left, lock = [len(futures)], threading.Lock()

    def one_done(_):
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            for x in fds:
                os.close(x)
    for f in futures:
        f.add_done_callback(one_done)

