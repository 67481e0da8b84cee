"""One writer per run directory: rank 0 holds an exclusive POSIX lock on RUN_DIR/train.lock for the whole
run, and the file holds a record of the holder (host, pid, SLURM job) that a refused second job prints.

POSIX (fcntl) locks because NFS implements them across clients (NLM for v3, in the protocol for v4; Linux
emulates flock() on NFS with them anyway), and the kernel drops them when the holder exits, however it
dies. A node that dies holding one keeps it until the server notices (the NFSv4 lease, about 90 s; for
v3, the node's reboot), so two holders count as gone and their lock is broken by replacing the file:
  * the record names this machine (same host, same boot) and a process that no longer runs there;
  * the record names this SLURM job with a lower restart count: the job was requeued (same id) and its
    previous run is over.
Breaking is serialised by a second lock (`train.lock.break`), so two jobs cannot both break and win.
A POSIX lock belongs to the process and is released when the process closes *any* descriptor of the
file: the holder never opens it twice. Readers (evaluators, samplers) take no lock.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

from vqd_scale.errors import UserError
from vqd_scale.train.checkpoint import LOCK_FILE

_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # filesystems without (coherent) POSIX locks
_HELD: dict[tuple[int, int], Path] = {}  # (device, inode) of lock files this process holds


class RunDirLocked(UserError):
    """Another training job writes this run directory; the message names it."""


def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> Optional[int]:
    """A process's start time in clock ticks since boot (tells a reused pid from the original)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def holder_record() -> dict:
    """Who this process is, as written into the lock file."""
    env = os.environ
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
            "pid_start": _start_time(os.getpid()), "slurm_job": env.get("SLURM_JOB_ID"),
            "slurm_restart": int(env.get("SLURM_RESTART_COUNT", "0") or 0), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:300]}


def read_holder(run_dir: str | os.PathLike) -> Optional[dict]:
    """The record in RUN_DIR/train.lock (None when absent or unreadable). Never call it in the holder."""
    try:
        rec = json.loads((Path(run_dir) / LOCK_FILE).read_text() or "null")
        return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):
        return None


def is_stale(holder: Optional[dict], me: Optional[dict] = None) -> bool:
    """Whether the holder is certainly gone (see the module docstring); a stranger is never stale."""
    if not holder:
        return False
    me = me or holder_record()
    if holder.get("slurm_job") and holder["slurm_job"] == me["slurm_job"]:
        return int(holder.get("slurm_restart") or 0) < me["slurm_restart"]
    if holder.get("host") != me["host"]:
        return False
    if holder.get("boot_id") and me["boot_id"] and holder["boot_id"] != me["boot_id"]:
        return True  # this machine rebooted since
    pid = int(holder.get("pid") or 0)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    started = _start_time(pid)
    return started is not None and holder.get("pid_start") is not None and started != holder["pid_start"]


def describe(holder: Optional[dict]) -> str:
    if not holder:
        return "a job that has not written its record yet"
    job = f", SLURM job {holder['slurm_job']} (restart {holder.get('slurm_restart', 0)})" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{job}, since {holder.get('started')}"


class RunLock:
    """The held lock; `release()` (or the process's end, however it ends) frees it."""

    def __init__(self, fd: Optional[int], path: Path):
        self.fd, self.path = fd, path  # fd None: a filesystem without locks, guarded by the record alone

    def release(self) -> None:
        if self.fd is None:
            if self.path is not None and (read_holder(self.path.parent) or {}).get("pid") == os.getpid():
                self.path.write_text("")
            self.path = None
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)  # no record: nobody is named as the writer any more
        st = os.fstat(self.fd)
        _HELD.pop((st.st_dev, st.st_ino), None)
        os.close(self.fd)  # releases the lock
        self.fd = None


def _refusal(run_dir: Path, holder: Optional[dict]) -> RunDirLocked:
    return RunDirLocked(
        f"run directory {run_dir} is being written by another training job ({describe(holder)}); two writers "
        "would log every step twice and overwrite each other's checkpoints. Wait for it to end or stop it, or "
        f"use another run_dir (the lock is {run_dir / LOCK_FILE}, released when that job's process exits)")


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)  # held only while a stale lock is being replaced: never long
        yield
    finally:
        os.close(fd)


def _try_lock(path: Path) -> Optional[int]:
    """A descriptor holding the lock on the file now at `path`, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) in _HELD:  # POSIX locks are per process: a second lockf would "succeed"
            raise RunDirLocked(f"run directory {path.parent} is already locked by this process")
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino != st.st_ino:  # replaced while we locked it: that copy guards nothing
            os.close(fd)
            return None
        return fd
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return None
        raise
    except BaseException:
        os.close(fd)
        raise


def _hold(fd: int, path: Path) -> RunLock:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder_record()).encode(), 0)
    os.fsync(fd)
    st = os.fstat(fd)
    _HELD[(st.st_dev, st.st_ino)] = path
    return RunLock(fd, path)


def acquire(run_dir: str | os.PathLike) -> RunLock:
    """Lock an existing run directory for this process, or raise RunDirLocked naming the holder."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    try:
        fd = _try_lock(path)
    except OSError as e:
        if e.errno in _NO_LOCKS:
            return _record_only(run_dir, path, e)
        raise
    if fd is not None:
        return _hold(fd, path)
    if not is_stale(read_holder(run_dir)):
        raise _refusal(run_dir, read_holder(run_dir))
    with _exclusive(path.with_name(LOCK_FILE + ".break")):
        fd = _try_lock(path)  # another job may have broken it meanwhile; then its fresh record decides
        if fd is None:
            holder = read_holder(run_dir)
            if not is_stale(holder):
                raise _refusal(run_dir, holder)
            warnings.warn(f"{path}: breaking the lock of a training job that is gone ({describe(holder)})",
                          stacklevel=2)
            os.unlink(path)  # its holder's lock stays on the old inode, which guards nothing now
            fd = _try_lock(path)
            if fd is None:
                raise _refusal(run_dir, read_holder(run_dir))
        return _hold(fd, path)


def _record_only(run_dir: Path, path: Path, e: OSError) -> RunLock:
    """No POSIX locks on this filesystem: the record alone guards the directory (best effort)."""
    holder = read_holder(run_dir)
    if holder and not is_stale(holder) and holder.get("pid") != os.getpid():
        raise _refusal(run_dir, holder)
    warnings.warn(f"{path}: this filesystem has no POSIX locks ({e.strerror}); only the holder record guards "
                  "the run directory, so two jobs started at the same moment are not told apart", stacklevel=3)
    path.write_text(json.dumps(holder_record()))
    return RunLock(None, path)
