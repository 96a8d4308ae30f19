"""Checkpoint claims: a checkpoint path belongs to one live run at a time.

Two runs writing the same checkpoint would each overwrite the other's state, and `--resume` would
then silently continue the wrong run. A run therefore *claims* its checkpoint path before it
trains: it holds an exclusive `flock` on a small sidecar file next to the checkpoint,

    ck.npz  ->  .ck.npz.lock   (hidden; it holds the owner's pid and command line, as JSON)

and a second run naming the same path (in another process, or another `Trainer` in the same
one) is refused with a `CheckpointInUseError` that names the owner.

Why `flock` and not a pid file: the kernel drops a `flock` when its process dies, however it
dies (SIGKILL and the OOM killer included), so a claim left by a killed run never blocks
anyone, and there is no guessing whether a recorded pid is still the same process (pids are
reused; recording the start time from /proc would narrow that race, the lock removes it). The
owner's pid in the file is only there to write a helpful message.

The sidecar is removed when the claim is released (`release()`, the end of a `with` block,
garbage collection or normal interpreter exit), and so is a checkpoint folder the claim had to
create if nothing was written into it. A run killed outright leaves the sidecar behind; such a
file is unlocked, harmless, and taken over by the next run. The sidecar is unlinked while it is
still locked, and a contender that opened it just before checks, once it holds the lock, that
the path still names the file it locked (else it starts again), so two runs can never both
believe they hold a path.

Claims are per machine: runs on two hosts sharing a network folder may not see each other's
(`flock` over NFS depends on the server).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import stat
import sys
import time
import weakref
from pathlib import Path


class CheckpointInUseError(RuntimeError):
    """Another live run holds the claim on a checkpoint path; `owner` describes it."""

    def __init__(self, message: str, owner: dict):
        super().__init__(message)
        self.owner = owner


class UnsafeLockFileError(OSError):
    """The sidecar lock file is a symbolic link, a hard link or not a regular file."""


def claim_file(path: str | os.PathLike) -> Path:
    """The sidecar lock file of checkpoint `path`: `.NAME.lock` in the same folder."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


class CheckpointClaim:
    """An exclusive claim on checkpoint `path` for as long as this object holds it.

    Parameters
    ----------
    path : path of the checkpoint (it need not exist; its folder is created if needed).
    command : str, optional
        How to describe this run to a refused contender (default: this process's command line).

    Raises
    ------
    CheckpointInUseError
        A live run (another process, or another claim in this one) holds `path`.
    OSError
        The sidecar cannot be created (e.g. the folder is not writable); `UnsafeLockFileError`
        when it is a symbolic link, a hard link or not a regular file (never followed).

    Examples
    --------
    >>> with CheckpointClaim("ck.npz"):                                 # doctest: +SKIP
    ...     trainer.fit(X, y)          # a second run naming ck.npz is refused meanwhile
    """

    def __init__(self, path: str | os.PathLike, command: str | None = None):
        self.path = Path(path)
        self.lock_path = claim_file(self.path)
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "command": command or _command_line(), "checkpoint": str(self.path)}
        created = _missing_folders(self.lock_path.parent)
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = _lock(self.lock_path, self.path, owner)
        except BaseException:
            _remove_if_empty(created)
            raise
        self._finalizer = weakref.finalize(self, _unlock, fd, self.lock_path, os.getpid(),
                                           created)

    @property
    def held(self) -> bool:
        """Whether this object still holds the claim."""
        return self._finalizer.alive

    def covers(self, path: str | os.PathLike) -> bool:
        """Whether this claim is held and is the one on `path` (however `path` is spelled)."""
        return self.held and _same_path(claim_file(path), self.lock_path)

    def release(self) -> None:
        """Give the path up (idempotent): remove the sidecar and drop the lock."""
        self._finalizer()

    def __enter__(self) -> CheckpointClaim:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"CheckpointClaim('{self.path}', {'held' if self.held else 'released'})"


def _command_line() -> str:
    argv = list(sys.argv) or [""]
    if argv[0] in ("", "-c"):
        return "python -c ..."
    if argv[0].endswith(("partrain/__main__.py", "/partrain")):
        argv[0] = "partrain"
    return shlex.join(argv)


def _same_path(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _open_sidecar(lock_path: Path, path: Path) -> int:
    """Open (or create) the sidecar without following a symbolic link, and only if it is a
    regular file of at most one link: a planted link would have partrain truncate and fill
    another file. As SQLite and OpenSSH do, refuse rather than follow."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NOCTTY
                     | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        fd, what = None, "a symbolic link"
    else:  # (0 links: its owner has just removed it, and `_lock` starts again)
        info = os.fstat(fd)
        what = "not a regular file" if not stat.S_ISREG(info.st_mode) else \
            f"a file with {info.st_nlink} hard links" if info.st_nlink > 1 else None
    if what is None:
        return fd
    if fd is not None:
        os.close(fd)
    raise UnsafeLockFileError(f"The lock file {lock_path} of checkpoint '{path}' is {what}: "
                              "partrain neither follows nor writes into it; remove it and run "
                              "again.")


def _lock(lock_path: Path, path: Path, owner: dict) -> int:
    """Open, lock and fill the sidecar; return its descriptor (close-on-exec, as Python's are)."""
    for _ in range(100):
        fd = _open_sidecar(lock_path, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read_owner(fd)
            os.close(fd)
            raise CheckpointInUseError(_in_use_message(path, other), other) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
            return fd
        os.close(fd)  # its previous owner removed the file between our open and our lock
    raise OSError(f"Could not claim '{path}': its lock file {lock_path} keeps changing.")


def _unlock(fd: int, lock_path: Path, pid: int, created: list[Path]) -> None:
    if os.getpid() == pid:  # a forked child shares the lock; only its owner removes the file
        try:
            current, mine = os.stat(lock_path), os.fstat(fd)
            if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                lock_path.unlink()
        except OSError:
            pass
    os.close(fd)
    if os.getpid() == pid:
        _remove_if_empty(created)


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


def _read_owner(fd: int) -> dict:
    try:
        owner = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (OSError, ValueError):
        owner = {}
    return owner if isinstance(owner, dict) else {}


def _in_use_message(path: Path, owner: dict) -> str:
    pid, host = owner.get("pid"), owner.get("host")
    if pid == os.getpid() and host == socket.gethostname():
        return (f"The checkpoint '{path}' is already claimed in this process (pid {pid}), by a "
                "Trainer that is fitting or a CheckpointClaim not yet released: let that end "
                "first, or choose another checkpoint path.")
    if pid is None:
        who = "another process (its details were not written yet)"
    else:
        where = f" on {host}" if host and host != socket.gethostname() else ""
        who = (f"pid {pid}{where} ({owner.get('command', '?')}), started "
               f"{owner.get('started', '?')}")
    return (f"The checkpoint '{path}' belongs to a run that is still going: {who}. Wait for it "
            "to end (or stop it), or choose another checkpoint path.")
