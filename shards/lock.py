"""One writer per output directory: a lock that names its holder and outlives no process.

Two writers on one output corrupt it: the second deletes the first one's temporary
files and both number the same shard. Every command that writes an output directory
(shard sets through `ShardWriter`, crawls, imports, `shards.split`, training runs) takes
its lock first; a second one is refused with an error naming the holder's pid and host.

On a local or mounted file system the lock is `filelock`'s `flock` on `DIR/.writer.lock`:
the kernel releases it when its process ends however it ends (SIGKILL included; on NFS
the server's lease expires), so a lock left by a killed writer is simply taken by the
next one. The holder writes its pid, host and start time into the file, which is all a
refused writer reads.

Object stores have no locks. There the lock is an object, `DIR/.writer.lock`, created
only if absent (a conditional write: S3's If-None-Match; a store without one gets a
check-then-write) and rewritten with a heartbeat every `heartbeat_s` by a thread of the
holder. A lock whose holder is a dead pid on this host, or whose heartbeat is older than
`stale_s`, is taken over. This is a best effort: it refuses a second writer that starts
while the first is alive, but two writers taking over one stale lock in the same instant,
or a holder stalled past `stale_s`, can both write; and hosts' clocks must roughly agree.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from shards.fs import is_local, join, open_fs

log = logging.getLogger(__name__)

LOCK_NAME = ".writer.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class OutputLocked(RuntimeError):
    """Another process writes this output; the message names it by pid and host."""


def _record(token: str = "") -> dict[str, Any]:
    now = time.time()
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": now, "heartbeat": now, "token": token}


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(data)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    typed = isinstance(record.get("pid"), int) and isinstance(record.get("host"), str)
    return record if typed and isinstance(record.get("since"), (int, float)) else None


def describe(record: dict[str, Any] | None) -> str:
    if record is None:
        return "another process (it has not recorded its pid and host yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["since"]))
    return f"pid {record['pid']} on host {record['host']} (since {since})"


def _alive_here(record: dict[str, Any]) -> bool:
    """False only for a holder recorded on this host whose pid no longer runs."""
    if record["host"] != socket.gethostname():
        return True
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


class OutputLock:
    """The lock of the output directory `directory` (a local path or a URL); a context manager.

    `acquire` raises OutputLocked naming the holder. The lock is not reentrant: a second
    OutputLock on the same directory is refused even in the same process (a crawl hands its
    own to the shard writer it opens instead).
    """

    def __init__(self, directory: str | os.PathLike, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> None:
        self.directory = str(directory)
        self.fs, root = open_fs(self.directory)
        self.path = join(root, LOCK_NAME)
        self.local = is_local(self.fs)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self._file_lock: Any = None
        self._token = ""
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._file_lock is not None or bool(self._token)

    def covers(self, directory: str | os.PathLike) -> bool:
        """Whether this lock is held and is the lock of `directory`."""
        return self.held and os.path.realpath(self.directory) == os.path.realpath(directory)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _refused(self, holder: dict[str, Any] | None) -> OutputLocked:
        return OutputLocked(
            f"{self.directory} is being written by {describe(holder)}; wait for it to finish, or choose another output"
        )

    def acquire(self) -> "OutputLock":
        if self.local:
            self._acquire_local()
        else:
            self._acquire_object()
        return self

    def release(self) -> None:
        if self._file_lock is not None:
            # An empty file tells the next holder that this one released it (a record left in
            # the file means its writer died holding it).
            os.truncate(self.path, 0)
            self._file_lock.release()
            self._file_lock = None
        if self._token:
            self._stop.set()
            if self._beat is not None:
                self._beat.join()
            if (self._read_object() or {}).get("token") == self._token:
                self.fs.rm(self.path)
            self._token, self._beat = "", None

    # -- local: flock -----------------------------------------------------------------------

    def _acquire_local(self) -> None:
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.path, timeout=0, on_acquired=self._write_record)
        try:
            lock.acquire()
        except Timeout:
            raise self._refused(_parse(Path(self.path).read_bytes())) from None
        self._file_lock = lock

    def _write_record(self, fd: int) -> None:
        """filelock's on_acquired: note a holder that died holding the lock, then record this one."""
        left = _parse(os.pread(fd, 4096, 0))
        if left is not None:
            log.warning("%s: took over the lock left by %s, which ended without releasing it",
                        self.directory, describe(left))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_record()).encode(), 0)

    # -- object stores: a conditional write and a heartbeat ---------------------------------------

    def _read_object(self) -> dict[str, Any] | None:
        try:
            return _parse(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None

    def _create_object(self, record: dict[str, Any]) -> bool:
        """Write the lock object if there is none; False if there is one."""
        data = json.dumps(record).encode()
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):  # no conditional write here: check, then write
            if self.fs.exists(self.path):
                return False
            self.fs.pipe_file(self.path, data)
            return True

    def _stale(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:  # unreadable, or gone meanwhile: judged by its age
            try:
                return time.time() - self.fs.modified(self.path).timestamp() > self.stale_s
            except FileNotFoundError:
                return True
        return not _alive_here(holder) or time.time() - holder.get("heartbeat", holder["since"]) > self.stale_s

    def _acquire_object(self) -> None:
        record = _record(secrets.token_hex(16))
        for _ in range(2):  # a stale lock is removed once, then created afresh
            if self._create_object(record):
                break
            holder = self._read_object()
            if not self._stale(holder):
                raise self._refused(holder)
            log.warning("%s: taking over the stale lock of %s", self.directory, describe(holder))
            try:
                self.fs.rm(self.path)
            except FileNotFoundError:  # someone else removed it first
                pass
        else:
            raise self._refused(self._read_object())
        if (self._read_object() or {}).get("token") != record["token"]:  # lost a race for the stale lock
            raise self._refused(self._read_object())
        self._token = record["token"]
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, args=(record,), name="output-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self, record: dict[str, Any]) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = self._read_object()
                if (current or {}).get("token") != record["token"]:
                    log.error("%s: this process lost its lock to %s", self.directory, describe(current))
                    return
                record["heartbeat"] = time.time()
                self.fs.pipe_file(self.path, json.dumps(record).encode())
            except OSError as exc:  # a store that is briefly unreachable: try again at the next beat
                log.warning("%s: lock heartbeat failed: %s", self.directory, exc)
