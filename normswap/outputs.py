"""Every file a run writes is claimed as a whole before any work, written to a hidden staged
file beside its final name, and moved into place only when the whole job succeeded.

Rules (the README's "Loading models safely" section states them for users):

* **Inputs are never touched**: an output may not name an input of the run (model, data,
  the ONNX file being checked), even with ``--force``; nor may two outputs of one run name the
  same file (``-o``, ``--onnx``, ``--json``, ``--report``).
* **Claimed as a whole**: before any work, each final name gets a claim file
  ``.NAME.normswap-claim`` (created exclusively, holding ``pid start-time nonce`` and kept
  open with an exclusive ``flock`` for the whole run).  A claim counts as held only while a
  process holds its lock *and* that process is the one named in it (same pid, same start
  time from ``/proc/<pid>/stat``, so a recycled pid is never trusted): a second normswap run
  stops at once with exit 2 and touches nothing.  A claim whose lock nobody holds is the
  leftover of a killed run and is taken over.  A claim locked by some other program, or a
  claim name that is not a regular file (a FIFO, a folder), is waited for a few seconds
  (``NORMSWAP_CLAIM_WAIT``, default 10) and then refused with a message naming the file and
  what to do -- never waited on forever.  Without ``--force`` an existing file is refused
  before any work.
* **Nothing partial**: outputs are written as ``.NAME.normswap-PID-NONCE.tmp.EXT`` and moved
  into place together at the end.  Before the moves a journal ``.normswap-commit-PID-NONCE.json``
  lists them (with the run's pid, start time and nonce), so a run killed in the middle of its
  moves is completed by the next run in that folder (never one file of a set without the
  others).  Recovery is deliberately narrow: it completes only moves of regular staged files
  owned by this user that carry the journal run's pid and nonce and are named after their final
  name, inside the journal's folder, never over an input of the recovering run, and never over
  an existing file unless the killed run had ``--force``; a journal that is anything else is
  left alone with a warning.  A failed run removes its staged files and claims; SIGTERM,
  SIGINT and SIGHUP remove them at once and end the run (see :func:`install_signal_handlers`);
  the leftovers of a SIGKILLed run (staged files, unlocked claims) are recognisable by name
  and removed by the next run that writes into the same folder.
* **Names that fit**: a final name longer than the file system allows (``NAME_MAX``), or a
  path longer than ``PATH_MAX``, is a one-line error before any work; the hidden names of a
  long (but legal) final name are shortened with a hash so that they fit too.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import signal
import stat
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from normswap.errors import NormswapError

try:  # POSIX advisory locks; elsewhere claims fall back to the pid / start-time test
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["OutputSet", "install_signal_handlers", "clean_leftovers", "STAGED_RE", "interrupted_by",
           "check_path_length", "show_path"]

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


def _recover_journal(j: Path, protected: set[Path]) -> tuple[list[str], list[str]]:
    """Complete the moves an interrupted commit listed in journal ``j`` -- only those it may
    (see the module docstring).  Returns (notes, warnings)."""
    folder = j.parent
    notes: list[str] = []
    warnings_: list[str] = []

    def leave(why: str) -> tuple[list[str], list[str]]:
        return [], [f"left {j.name} alone ({why}); nothing was moved; delete it if no normswap write into "
                    f"{show_path(_resolve(folder))} was interrupted"]

    jm = _JOURNAL_RE.match(j.name)
    jpid = int(jm.group("pid"))
    try:
        st = os.lstat(j)
    except OSError:
        return [], []
    if not stat.S_ISREG(st.st_mode):
        return leave(f"a {_kind_of(st)}, not a file")
    if not _owned_regular(st):
        return leave("it belongs to another user")
    data = _read_small(j)
    try:
        doc = json.loads(data.decode()) if data is not None else None
    except (ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict) or doc.get("normswap_journal") != _JOURNAL_VERSION:
        return leave("not a normswap commit journal: unknown format")
    pid, start, nonce, moves = doc.get("pid"), doc.get("start"), doc.get("nonce"), doc.get("moves")
    if pid != jpid or not isinstance(start, str) or not isinstance(nonce, str) or not _NONCE_RE.match(nonce) \
            or not isinstance(moves, list) or not moves or (jm.group("nonce") and jm.group("nonce") != nonce):
        return leave("its pid, nonce or move list is malformed")
    if _pid_alive(jpid, start):
        return [], []  # its run is alive (committing right now): not ours to touch
    for mv in moves:
        if not (isinstance(mv, list) and len(mv) == 2 and _plain_name(mv[0]) and _plain_name(mv[1])):
            return leave("a move names a path outside its folder")
        staged, final = mv
        m = STAGED_RE.match(staged)
        if not m or int(m.group("pid")) != jpid or m.group("nonce") != nonce \
                or _staged_path(folder / final, jpid, nonce).name != staged:
            return leave(f"{staged!r} is not a file staged by that run for {final!r}")
        if STAGED_RE.match(final) or _CLAIM_RE.match(final) or _JOURNAL_RE.match(final):
            return leave(f"{final!r} is a normswap working file, not an output")
    force = doc.get("force") is True
    complete = True
    for staged, final in moves:
        s, f = folder / staged, folder / final
        try:
            sst = os.lstat(s)
        except FileNotFoundError:
            continue  # moved before the kill
        except OSError:
            complete = False
            continue
        if not _owned_regular(sst):
            warnings_.append(f"{j.name}: left {s} alone (not a regular file of this user)")
            complete = False
            continue
        if _is_protected(f, protected) or _is_protected(s, protected):
            warnings_.append(f"{j.name}: did not move {staged} to {f}: {f.name} is an input of this run "
                             "(inputs are never overwritten)")
            complete = False
            continue
        try:
            fst = os.lstat(f)
        except FileNotFoundError:
            fst = None
        except OSError:
            complete = False
            continue
        try:
            if fst is not None and (fst.st_dev, fst.st_ino) == (sst.st_dev, sst.st_ino):
                os.unlink(s)  # hard-linked into place before the kill: only the staged name is left
            elif fst is None:
                try:
                    os.link(s, f)  # never replaces a file that appeared meanwhile
                    os.unlink(s)
                except FileExistsError:
                    warnings_.append(f"{j.name}: did not complete the write of {f}: it exists")
                    complete = False
                    continue
                except OSError:
                    os.rename(s, f)
            elif force and stat.S_ISREG(fst.st_mode):
                os.replace(s, f)
            else:
                warnings_.append(f"{j.name}: did not complete the write of {f}: it exists and the "
                                 "interrupted run had no --force")
                complete = False
                continue
            notes.append(f"completed an interrupted write of {f}")
        except OSError as e:
            warnings_.append(f"{j.name}: could not complete the write of {f} ({e.strerror or e})")
            complete = False
    # done with it: what could not be completed is said in the warnings (its staged files are
    # then removed as leftovers of a killed run)
    with contextlib.suppress(OSError):
        os.unlink(j)
    del complete
    return notes, warnings_


def clean_leftovers(folder: Path, protect: Iterable = (), warnings: list[str] | None = None) -> list[str]:
    """Complete or remove what killed runs left in ``folder``; returns what was done.

    ``protect``: the inputs of the current run, never moved over, replaced or removed.
    ``warnings``: a list that receives what was left alone and why (a journal that is not one
    this run may complete, see the module docstring)."""
    done: list[str] = []
    warns = warnings if warnings is not None else []
    protected = _protected_set(protect)
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return done
    # 1. journals of dead runs: finish their renames (roll forward), within the rules
    for p in entries:
        if _JOURNAL_RE.match(p.name):
            n, w = _recover_journal(p, protected)
            done.extend(n)
            warns.extend(w)
    # 2. staged files and claims of dead runs (a staged file counts as live only while its
    #    writer is alive and still holds the claim on its final name)
    for p in entries:
        m = STAGED_RE.match(p.name)
        if m:
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if not _owned_regular(st) or _is_protected(p, protected):
                continue
            pid = int(m.group("pid"))
            claim = p.with_name(f".{m.group('name')}{m.group('ext') or ''}{_CLAIM_SUFFIX}")
            pr = _probe_claim(claim)
            live = pr.state == "live" and pr.pid == pid and (not m.group("nonce") or not pr.nonce
                                                             or pr.nonce == m.group("nonce"))
            if not live:
                with contextlib.suppress(OSError):
                    p.unlink()
                    done.append(f"removed {p.name} left by a killed run")
            continue
        m = _CLAIM_RE.match(p.name)
        if m and not _is_protected(p, protected):
            pr = _probe_claim(p)
            if pr.state == "stale" and _remove_stale_claim(p, pr):
                done.append(f"removed {p.name}, a claim no running normswap run holds (left by a killed run)")
    return done


def _remove_stale_claim(c: Path, pr: _Probe) -> bool:
    """Remove claim ``c`` that nobody holds -- only if it is still that same unlocked file."""
    try:
        fd = os.open(c, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fst = os.fstat(fd)
        if pr.ino is not None and (fst.st_dev, fst.st_ino) != pr.ino:
            return False
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # someone holds it now
            except OSError:
                pass
        try:
            st = os.lstat(c)
        except OSError:
            return False
        if (st.st_dev, st.st_ino) != (fst.st_dev, fst.st_ino):
            return False
        os.unlink(c)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# ------------------------------------------------------------------------- signals

#: the OutputSets of this process that hold claims (a signal removes their files at once)
_ACTIVE: "weakref.WeakSet[OutputSet]" = weakref.WeakSet()
_INTERRUPTED: list[int] = []


def interrupted_by() -> int | None:
    """The signal that interrupted this process (SIGTERM, SIGINT, SIGHUP), or None."""
    return _INTERRUPTED[0] if _INTERRUPTED else None


def abort_all() -> None:
    """Remove the staged files and claims of every OutputSet of this process that holds some."""
    for outs in list(_ACTIVE):
        with contextlib.suppress(Exception):
            outs.abort()


atexit.register(abort_all)


class OutputSet:
    """The files one run writes.

    ``outs = OutputSet({"-o": "m.gn.pt", "--onnx": "m.gn.onnx"}, inputs=[model, calib], force=False)``;
    ``outs.claim()`` validates and claims every name before any work;
    ``outs.staged("-o")`` is the hidden path to write that output to;
    ``outs.commit()`` moves every written staged file into place (the set together);
    ``outs.release()`` (always, in ``finally``) removes staged files and claims.  Use it as a
    context manager: ``with OutputSet(...) as outs: ...; outs.commit()``.
    ``outs.notes`` / ``outs.warnings``: what cleaning the output folders did / left alone.
    """

    def __init__(self, outputs: dict[str, str | os.PathLike | None], *, inputs: Iterable = (), force: bool = False,
                 share: bool = False):
        self.force = bool(force)
        #: share claims this process already holds (a single-file writer inside a run whose
        #: OutputSet claimed the name, e.g. io.staged_output under the CLI's run_job)
        self.share = bool(share)
        self.final: dict[str, Path] = {k: Path(v) for k, v in outputs.items() if v is not None and str(v) != ""}
        # inputs: paths, or (label, path) pairs ("the input model", "the --calib data", ...)
        self.inputs: list[tuple[str, Path]] = []
        for item in inputs:
            label, p = item if isinstance(item, tuple) else ("an input", item)
            if p is not None and not _is_special(p) and str(p) != "":
                self.inputs.append((label, Path(p)))
        #: this run's mark on its staged files and journal (recovery trusts only matching names)
        self.nonce = secrets.token_hex(8)
        self._owner = os.getpid()  # a forked child (a data-loader worker) never touches these files
        self._staged: dict[str, Path] = {}
        self._claims: dict[Path, int] = {}  # claim file -> open, flock'ed descriptor
        self.committed: list[Path] = []
        self.notes: list[str] = []
        self.warnings: list[str] = []
        self.aborted = False

    # ----------------------------------------------------------------- validation + claim

    def check_names(self) -> None:
        """Names the file system cannot hold: one line each, before anything touches the disk."""
        for opt, p in self.final.items():
            try:
                check_path_length(p, opt, extra=_HIDDEN_OVERHEAD)
            except NormswapError as e:
                raise _err(opt, str(e)) from None

    def validate(self) -> None:
        self.check_names()
        try:
            self._validate()
        except OSError as e:  # e.g. ENAMETOOLONG / ELOOP from a path the checks above let through
            raise NormswapError(f"{show_path(e.filename or '')}: {e.strerror or e}") from None

    def _validate(self) -> None:
        seen: dict[Path, str] = {}
        ins: dict[Path, tuple[str, Path]] = {}
        for label, p in self.inputs:
            ins.setdefault(_resolve(p), (label, p))
        for opt, p in self.final.items():
            r = _resolve(p)
            shown = show_path(p)
            if r in ins:
                label, src = ins[r]
                raise _err(opt, f"{opt} {shown} is {label} of this run ({show_path(src)}), not a place to write: "
                                f"choose another name (inputs are never overwritten, even with --force)")
            if r in seen:
                raise _err(opt, f"{seen[r]} and {opt} would both be {shown}; give each output its own file")
            seen[r] = opt
            if p.is_dir():
                raise _err(opt, f"{opt} {shown} is a directory, expected a file path")
            parent = p.parent if str(p.parent) else Path(".")
            if not parent.is_dir():
                raise _err(opt, f"{opt} {shown}: output folder {show_path(parent)} does not exist")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise _err(opt, f"{opt} {shown}: output folder {show_path(parent)} is not writable")
            if os.path.lexists(p) and not p.exists():
                raise _err(opt, f"{opt} {shown} is a broken symbolic link; remove it or choose another name")
            if p.exists() and not stat.S_ISREG(p.stat().st_mode):
                raise _err(opt, f"{opt} {shown} is a {_kind_of(p.stat())}, not a regular file; choose another name")
            if p.exists() and not self.force:
                raise _err(opt, f"{opt} {shown} exists; pass --force to overwrite it")

    def claim(self) -> "OutputSet":
        self.check_names()
        folders = {(p.parent if str(p.parent) else Path(".")) for p in self.final.values()}
        for f in folders:
            if _exists_quietly(f):
                self.notes.extend(clean_leftovers(f, protect=[p for _, p in self.inputs], warnings=self.warnings))
        self.validate()
        _ACTIVE.add(self)
        wait = _claim_wait()
        for opt, p in sorted(self.final.items(), key=lambda kv: str(_resolve(kv[1]))):
            c = _claim_path(p)
            deadline = time.monotonic() + wait
            while True:
                try:
                    if self._create_claim(c):
                        break
                except OSError as e:
                    self.release()
                    raise _err(opt, f"{opt} {show_path(p)}: cannot write in {show_path(c.parent)} "
                                    f"({e.strerror or e})") from None
                pr = _probe_claim(c)
                if pr.state == "gone":
                    continue
                if pr.state == "live":
                    if pr.pid == os.getpid() and self.share:  # an outer OutputSet of this run holds it
                        break
                    self.release()
                    raise _err(opt, f"{show_path(p)} is being written by another normswap run "
                                    f"({_program(pr.pid)}); wait for it or choose another name")
                if pr.state == "special":
                    self.release()
                    raise _err(opt, f"{show_path(p)} cannot be claimed: {show_path(c)} is a {pr.detail}, not a "
                                    f"normswap claim file; nothing was written. If no normswap run is writing "
                                    f"{p.name}, delete {c.name} and rerun")
                if pr.state == "stale":
                    if _remove_stale_claim(c, pr):
                        self.notes.append(f"took over {c.name}, left by a run that is gone")
                    continue
                if time.monotonic() >= deadline:  # foreign / creating: held, but not by a normswap run
                    self.release()
                    if pr.state == "foreign" or pr.holder:
                        who = _program(pr.holder) if pr.holder else "another program"
                        what = f"is held by {who}, which is not a normswap run writing it"
                    else:
                        what = "is an empty claim that nobody completed"
                    raise _err(opt, f"{show_path(p)} cannot be claimed: {show_path(c)} {what} (waited "
                                    f"{wait:g} s); nothing was written. Stop that program, or delete {c.name} if "
                                    f"no normswap run is writing {p.name}, then rerun")
                time.sleep(0.05)
        # re-check after claiming: a run that finished in between has written the file
        if not self.force:
            for opt, p in self.final.items():
                if p.exists():
                    self.release()
                    raise _err(opt, f"{opt} {show_path(p)} exists; pass --force to overwrite it")
        return self

    def _create_claim(self, c: Path) -> bool:
        """Create claim ``c`` exclusively and lock it; False when it exists."""
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        with _signals_deferred():  # a signal never finds a claim created but not recorded
            try:
                fd = os.open(c, flags, 0o644)
            except FileExistsError:
                return False
            self._claims[c] = fd
        if fcntl is not None:
            t0 = time.monotonic()
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:  # a prober looks at it for a few microseconds
                    if time.monotonic() - t0 > 2:
                        raise OSError(errno.EAGAIN, f"cannot lock {c.name}") from None
                    time.sleep(0.01)
                except OSError:  # a file system without locks: pid + start time only
                    break
        os.write(fd, f"{os.getpid()} {_start_time(os.getpid()) or '-'} {self.nonce}\n".encode())
        return True

    # ----------------------------------------------------------------- staging + commit

    def staged(self, opt: str) -> Path:
        """The hidden file to write output ``opt`` to (its name carries this run's pid and nonce)."""
        if opt not in self.final:
            raise KeyError(opt)
        if self.aborted:
            raise KeyboardInterrupt
        if opt not in self._staged:
            self._staged[opt] = _staged_path(self.final[opt], os.getpid(), self.nonce)
        return self._staged[opt]

    def discard(self, *opts: str) -> None:
        """Drop the staged files of ``opts`` (all when none given): they will not be committed."""
        for opt in opts or list(self._staged):
            s = self._staged.pop(opt, None)
            if s is not None:
                with contextlib.suppress(OSError):
                    s.unlink()

    def written(self) -> list[str]:
        """The options whose staged file has been written (what :meth:`commit` would move)."""
        return [opt for opt, s in self._staged.items() if s.exists()]

    def commit(self, *opts: str) -> list[Path]:
        """Move the written staged files (of ``opts``, default all) into place, the set together.

        A journal lists the moves first, so a run killed half-way is completed by the next run.
        Without ``force`` no existing file is replaced (hard links, no-clobber even against a
        process that is not normswap); if one final name appeared meanwhile, the files this
        commit already placed are taken back and nothing of the set is left.
        """
        if self.aborted:  # a signal removed the staged files: nothing may be placed now
            raise KeyboardInterrupt
        moves = []
        for opt, s in list(self._staged.items()):
            if opts and opt not in opts:
                continue
            if not s.exists():
                continue
            try:
                with open(s, "rb+") as f:
                    os.fsync(f.fileno())
                os.chmod(s, 0o666 & ~_umask())
            except OSError as e:
                raise NormswapError(f"{show_path(self.final[opt])}: cannot write ({e.strerror or e})") from None
            moves.append((opt, s, self.final[opt]))
        if not moves:
            return []
        if not self.force:
            for _, _, final in moves:
                if final.exists():
                    raise NormswapError(f"{show_path(final)} exists (created while this run worked); pass --force "
                                        f"to overwrite it")
        journals = []
        placed: list[Path] = []
        with _signals_deferred():
            try:
                for folder in {f.parent for _, _, f in moves}:
                    j = folder / f".normswap-commit-{os.getpid()}-{self.nonce}.json"
                    doc = {"normswap_journal": _JOURNAL_VERSION, "pid": os.getpid(),
                           "start": _start_time(os.getpid()), "nonce": self.nonce, "force": self.force,
                           "moves": [[s.name, f.name] for _, s, f in moves if f.parent == folder]}
                    fd = os.open(j, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
                    journals.append(j)
                    with os.fdopen(fd, "w") as fh:
                        fh.write(json.dumps(doc))
                        fh.flush()
                        os.fsync(fh.fileno())
                if not self.force:
                    try:
                        for _, s, f in moves:
                            os.link(s, f)  # fails if f exists: never replaces a file we did not create
                            placed.append(f)
                    except FileExistsError as e:
                        for f in placed:
                            with contextlib.suppress(OSError):
                                f.unlink()
                        raise NormswapError(f"{show_path(e.filename2 or e.filename)} exists (created while this "
                                            f"run worked); nothing was written; pass --force to overwrite it") from None
                    except OSError:  # a file system without hard links: plain renames
                        placed = []
                for _, s, f in moves:
                    if f in placed:
                        os.unlink(s)
                    else:
                        os.replace(s, f)
                for opt, _, f in moves:
                    self._staged.pop(opt, None)
                    self.committed.append(f)
            except OSError as e:
                raise NormswapError(f"cannot move the outputs into place ({e.strerror or e})") from None
            finally:
                for j in journals:
                    with contextlib.suppress(OSError):
                        j.unlink()
        return [f for _, _, f in moves]

    def release(self) -> None:
        """Remove this run's staged files and claims (safe to call again, and from a signal handler)."""
        if os.getpid() != self._owner:
            return
        for opt in list(self._staged):
            s = self._staged.pop(opt, None)
            if s is not None:
                with contextlib.suppress(OSError):
                    s.unlink()
        for c in list(self._claims):
            fd = self._claims.pop(c, None)
            if fd is None:
                continue
            with contextlib.suppress(OSError):
                st, fst = os.lstat(c), os.fstat(fd)
                if (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino):  # still ours: unlink, then unlock
                    os.unlink(c)
            with contextlib.suppress(OSError):
                os.close(fd)
        _ACTIVE.discard(self)

    def abort(self) -> None:
        """Release now and refuse any later :meth:`commit` (a signal ended the run)."""
        self.aborted = True
        self.release()

    def __enter__(self) -> "OutputSet":
        return self.claim()

    def __exit__(self, *exc) -> None:
        self.release()


def _err(opt: str | None, message: str) -> NormswapError:
    """A NormswapError that remembers which option it is about (``e.option``)."""
    e = NormswapError(message)
    e.option = opt
    return e


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM/SIGHUP while the set is renamed into place (a few microseconds)."""
    pending: list[int] = []
    old = {}

    def hold(signum, frame):  # noqa: ARG001
        pending.append(signum)

    try:
        for s in _SIGNALS():
            old[s] = signal.signal(s, hold)
    except ValueError:  # not the main thread: signals cannot be handled here
        for s, h in old.items():
            signal.signal(s, h)
        old = {}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in pending:
            os.kill(os.getpid(), s)


def _SIGNALS() -> list:
    return [s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None]


def _on_signal(signum, frame):  # noqa: ARG001
    """SIGTERM / SIGINT / SIGHUP: remove this process's staged files and claims *now* (even if the
    code that runs swallows the KeyboardInterrupt), then unwind like Ctrl-C."""
    if not _INTERRUPTED:
        _INTERRUPTED.append(signum)
    abort_all()  # (in a forked child this touches nothing: the sets belong to the parent)
    raise KeyboardInterrupt


def ignore_signals() -> None:
    """While an interrupted run tidies up and exits: further signals are ignored."""
    for s in _SIGNALS():
        with contextlib.suppress(ValueError, OSError):
            signal.signal(s, signal.SIG_IGN)


def install_signal_handlers() -> None:
    """Turn SIGTERM, SIGINT and SIGHUP into KeyboardInterrupt after removing the staged files and
    claims of every claimed :class:`OutputSet` of the process (the CLI then exits 130)."""
    for s in _SIGNALS():
        with contextlib.suppress(ValueError, OSError):
            signal.signal(s, _on_signal)
