"""Atomic file output and hashing: outputs are written to a temporary file beside the target and renamed."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from chita_edge.core.errors import BadInput

# Disk full, file too large (RLIMIT_FSIZE), quota, read-only file system, permission denied, not a directory.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.ENOTDIR)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` only if the block succeeds.

    Nothing is left at ``target`` (or beside it) when the block raises.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        raise BadInput(f"{target}: directory {parent} does not exist")
    if not parent.is_dir():
        raise BadInput(f"{target}: {parent} is not a directory; choose another --out")
    if target.is_dir():
        raise BadInput(f"{target}: is a directory; give a file name")
    if target.exists() and not overwrite:
        raise BadInput(f"{target}: exists already; choose another --out or remove it")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=parent)
    except OSError as e:  # EACCES, EROFS, ENOSPC, ENOTDIR ...
        raise BadInput(f"{target}: cannot write in {parent} ({e.strerror}); choose a writable --out") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        try:
            os.chmod(tmp_path, _mode_for(target))  # mkstemp's 0600 would otherwise replace the file's mode
            os.replace(tmp_path, target)
        except OSError as e:
            raise BadInput(f"{target}: cannot write ({e.strerror})") from None
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        if isinstance(e, PermissionError) or e.errno in _WRITE_ERRNOS:
            raise BadInput(f"{target}: cannot write ({e.strerror}); nothing was written") from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask: from /proc on Linux, else read by setting it and putting it back at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(target: Path) -> int:
    """The permission bits an output gets: the existing file's, else what ``open()`` would give (0666 - umask)."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return ``path`` as a Path if it is a readable file, else raise BadInput naming it."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{p}: {what} not found")
    if not p.is_file():
        raise BadInput(f"{p}: {what} is not a regular file")
    if not os.access(p, os.R_OK):
        raise BadInput(f"{p}: {what} is not readable (permission denied)")
    return p


Paths = Iterable[tuple[str, str | os.PathLike | None]]


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same inode when both exist (hard and symbolic links included),
    else the same resolved path."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwrite(outputs: Paths, inputs: Paths) -> None:
    """Raise BadInput before anything is written when an output of a command would replace one of its inputs.

    ``outputs`` and ``inputs`` are ``(flag or name, path or None)`` pairs, e.g. ``[("--out", out)]`` and
    ``[("--weights", w), ("--data", "d.npz")]``; pairs whose path is None are ignored."""
    ins = [(name, p) for name, p in inputs if p is not None and str(p) != ""]
    for flag, out in outputs:
        if out is None or str(out) == "":
            continue
        for name, inp in ins:
            if same_file(out, inp):
                raise BadInput(f"{flag} {out}: is the input {name} {inp}; choose another {flag.split()[0]} "
                               "(an input is never overwritten)")


def check_out(out: Path, flag: str = "--out") -> None:
    """BadInput now, before any work, when ``out`` cannot be written: its directory is missing or not one, it is
    a directory, its name is too long, or the directory refuses a new file (a probe file is made and removed)."""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        if out.is_dir():
            raise BadInput(f"{flag} {out}: is a directory; give a file name")
        if not parent.is_dir():
            what = "does not exist" if not parent.exists() else "is not a directory"
            raise BadInput(f"{flag} {out}: directory {parent} {what}")
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=parent)
    except OSError as e:
        raise BadInput(f"{flag} {out}: cannot write there ({e.strerror}); choose another {flag}") from None
    os.close(fd)
    os.unlink(probe)
