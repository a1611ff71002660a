"""Claims and hidden names: who holds an output name, and whether it may be taken over.

The rules are stated in :mod:`normswap.outputs` (the one safe-write path); this module holds the
parts that read the file system and ``/proc``: a process's identity (pid + start time), the
hidden names a final name gets (claim, staged file), path-length checks, and the probe that tells
a live normswap claim from a killed run's leftover, a foreign program's lock or a special file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from normswap.errors import NormswapError

try:  # POSIX advisory locks; elsewhere claims fall back to the pid / start-time test
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["STAGED_RE", "check_path_length", "show_path"]

_CLAIM_SUFFIX = ".normswap-claim"
STAGED_RE = re.compile(r"^\.(?P<name>.+)\.normswap-(?P<pid>\d+)(?:-(?P<nonce>[0-9a-f]{16}))?\.tmp(?P<ext>\.[^.]*)?$")
_CLAIM_RE = re.compile(r"^\.(?P<name>.+)\.normswap-claim$")
_JOURNAL_RE = re.compile(r"^\.normswap-commit-(?P<pid>\d+)(?:-(?P<nonce>[0-9a-f]{16}))?\.json$")
_NONCE_RE = re.compile(r"^[0-9a-f]{16}$")
#: bytes the hidden names add to a final name (".", ".normswap-", pid, "-", nonce, ".tmp")
_HIDDEN_OVERHEAD = 42
_JOURNAL_VERSION = 1


def _start_time(pid: int) -> str:
    """The process's start time (Linux /proc; '' elsewhere): tells a reused pid from the writer."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read().decode(errors="replace")
        return stat_line.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _pid_alive(pid: int, start: str = "") -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return not start or start == _start_time(pid) or not _start_time(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OverflowError:
        return False
    if start:
        now = _start_time(pid)
        if now and now != start:  # the pid was reused by another process: the writer is gone
            return False
    return True


def _program(pid: int) -> str:
    """``pid 1234 (sleep)``: a process as a person would want to read it."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            name = f.read().decode(errors="replace").strip()
    except OSError:
        name = ""
    return f"pid {pid}" + (f" ({name})" if name else "")


def show_path(p) -> str:
    """A path short enough for a one-line message (a very long one is cut in the middle)."""
    s = str(p)
    return s if len(s) <= 100 else f"{s[:56]}...{s[-28:]}"


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder if str(folder) else ".", "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def _path_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder if str(folder) else ".", "PC_PATH_MAX"))
    except (OSError, ValueError):
        return 4096


def check_path_length(p, what: str, *, extra: int = 0) -> None:
    """A one-line :class:`NormswapError` when a component of ``p`` is longer than the file system
    allows or ``p`` (plus ``extra`` bytes) is longer than ``PATH_MAX`` -- instead of the
    ENAMETOOLONG that would otherwise surface half-way through a job."""
    p = Path(p)
    folder = p.parent
    while str(folder) not in ("", ".", "/") and not _exists_quietly(folder):
        folder = folder.parent
    name_max = _name_max(folder)
    for part in p.parts:
        n = len(os.fsencode(part))
        if part != "/" and n > name_max:
            kind = "the file name" if part == p.name else "a folder name in it"
            raise NormswapError(f"{what} {show_path(p)}: {kind} is {n} bytes long, the file system "
                                f"allows {name_max}; choose a shorter name")
    n = len(os.fsencode(str(p))) + extra
    limit = _path_max(folder)
    if n >= limit:
        raise NormswapError(f"{what} {show_path(p)}: the path is {len(os.fsencode(str(p)))} bytes long; the "
                            f"system allows {limit - 1 - extra} here; choose a shorter path")


def _exists_quietly(p: Path) -> bool:
    try:
        return os.path.isdir(p)
    except (OSError, ValueError):
        return False


def _hidden_key(final: Path) -> tuple[str, str]:
    """(stem, suffix) the hidden files of ``final`` are named after: the final name itself, or,
    when that would make a hidden name too long, its start plus a hash of the whole name."""
    name = final.name
    suffix = final.suffix if 0 < len(final.suffix) <= 16 else ""
    room = _name_max(final.parent) - _HIDDEN_OVERHEAD
    if len(os.fsencode(name)) <= room:
        return name[: len(name) - len(suffix)], suffix
    digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:16]
    head = name[: len(name) - len(suffix)]
    budget = room - len(digest) - 1 - len(os.fsencode(suffix))
    while head and len(os.fsencode(head)) > budget:
        head = head[:-1]
    return f"{head}~{digest}", suffix


def _claim_path(final: Path) -> Path:
    stem, suffix = _hidden_key(final)
    return final.with_name(f".{stem}{suffix}{_CLAIM_SUFFIX}")


def _staged_path(final: Path, pid: int, nonce: str) -> Path:
    stem, suffix = _hidden_key(final)
    return final.with_name(f".{stem}.normswap-{pid}-{nonce}.tmp{suffix}")


def _parse_claim(data: bytes) -> tuple[int, str, str]:
    parts = data.decode(errors="replace").split()
    try:
        pid = int(parts[0]) if parts else 0
    except ValueError:
        pid = -1
    start = parts[1] if len(parts) > 1 and parts[1] != "-" else ""
    return pid, start, (parts[2] if len(parts) > 2 else "")


def _read_claim(path: Path) -> tuple[int, str]:
    """(pid, start time) written in a claim file; (0, '') when it is no readable regular file.
    Never blocks (a FIFO is not opened)."""
    pr = _probe_claim(path, lock=False)
    return pr.pid, pr.start


def _kind_of(st) -> str:
    m = st.st_mode
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISDIR, "folder"), (stat.S_ISLNK, "symbolic link"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(m):
            return name
    return "special file"


def _lock_holders(st) -> list[int]:
    """Pids holding a lock on the file of ``st`` (from /proc/locks; [] when unknown)."""
    try:
        with open("/proc/locks", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    pids = []
    for line in text.splitlines():
        parts = line.split()
        if "->" in parts:  # a waiter, not a holder
            continue
        for i, tok in enumerate(parts[1:], 1):
            bits = tok.split(":")
            if len(bits) == 3:
                try:
                    key = (int(bits[0], 16), int(bits[1], 16), int(bits[2]))
                    pid = int(parts[i - 1])
                except ValueError:
                    continue
                if key == want and pid > 0:
                    pids.append(pid)
                break
    return pids


@dataclass
class _Probe:
    """What a claim file is: ``gone``, ``special`` (not a regular file), ``live`` (locked by the
    normswap run it names), ``foreign`` (locked by something else), ``creating`` (empty and
    new: a run is writing it right now), ``stale`` (nobody holds it)."""

    state: str
    pid: int = 0
    start: str = ""
    nonce: str = ""
    holder: int | None = None
    detail: str = ""
    ino: tuple | None = None


def _probe_claim(c: Path, lock: bool = True) -> _Probe:
    try:
        st = os.lstat(c)
    except FileNotFoundError:
        return _Probe("gone")
    except OSError as e:
        return _Probe("special", detail=e.strerror or str(e))
    if not stat.S_ISREG(st.st_mode):
        return _Probe("special", detail=_kind_of(st))
    try:
        fd = os.open(c, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return _Probe("gone")
    except OSError as e:
        return _Probe("special", detail=e.strerror or str(e))
    locked: bool | None = None
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            return _Probe("creating")  # replaced between lstat and open: look again
        data = os.read(fd, 512)
        if lock and fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                locked = False
            except BlockingIOError:
                locked = True
            except OSError:  # no locks on this file system: judge by the pid alone
                locked = None
    finally:
        os.close(fd)
    pid, start, nonce = _parse_claim(data)
    ino = (st.st_dev, st.st_ino)
    if not lock:
        return _Probe("unknown", pid, start, nonce, ino=ino)
    fresh = not data.strip() and time.time() - st.st_mtime < 2
    if locked is None:  # no lock information: the pid and its start time decide
        if fresh:
            return _Probe("creating", pid, start, nonce, ino=ino)
        return _Probe("live" if _pid_alive(pid, start) else "stale", pid, start, nonce, ino=ino)
    if not locked:
        return _Probe("creating" if fresh else "stale", pid, start, nonce, ino=ino)
    holders = _lock_holders(st)
    now = _start_time(pid) if pid > 0 else ""
    # a normswap run: the pid it names is alive, started when it says (where /proc tells: a claim
    # without a start time is no normswap claim) and, where /proc/locks tells, holds the lock
    if pid > 0 and _pid_alive(pid, start) and (start == now if now else True) and \
            (not holders or pid in holders):
        return _Probe("live", pid, start, nonce, holders[0] if holders else pid, ino=ino)
    if fresh:
        return _Probe("creating", pid, start, nonce, holders[0] if holders else None, ino=ino)
    return _Probe("foreign", pid, start, nonce, holders[0] if holders else None, ino=ino)


def _claim_alive(path: Path) -> bool:
    return _probe_claim(path).state in ("live", "foreign", "creating")


def _claim_wait() -> float:
    try:
        return max(0.0, float(os.environ.get("NORMSWAP_CLAIM_WAIT", "10")))
    except ValueError:
        return 10.0


def _owned_regular(st) -> bool:
    return stat.S_ISREG(st.st_mode) and (not hasattr(os, "getuid") or st.st_uid == os.getuid())


def _protected_set(protect: Iterable) -> set[Path]:
    out: set[Path] = set()
    for p in protect or ():
        if p is None or _is_special(p):
            continue
        p = Path(p)
        out.add(_resolve(p))
        with contextlib.suppress(OSError, ValueError):
            out.add(p.absolute())
    return out


def _is_protected(p: Path, protected: set[Path]) -> bool:
    if not protected:
        return False
    if _resolve(p) in protected:
        return True
    with contextlib.suppress(OSError, ValueError):
        if p.absolute() in protected:
            return True
    return False


def _read_small(p: Path, limit: int = 1 << 20) -> bytes | None:
    """The bytes of a small regular file, without following a link or blocking on a FIFO."""
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, limit + 1)
        return None if len(data) > limit else data
    finally:
        os.close(fd)


def _plain_name(x) -> bool:
    return isinstance(x, str) and x not in ("", ".", "..") and "/" not in x and "\0" not in x and \
        (os.sep == "/" or os.sep not in x)


def _is_special(p) -> bool:
    """Not a file: 'random', '-', or an in-memory input (a tensor, an array, a DataLoader)."""
    if not isinstance(p, (str, os.PathLike)):
        return True
    return isinstance(p, str) and p in ("random", "-")


def _resolve(p: Path) -> Path:
    try:
        return p.resolve()
    except (OSError, RuntimeError):
        return p.absolute()
