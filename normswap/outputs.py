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
import json
import os
import secrets
import signal
import stat
import time
import weakref
from pathlib import Path
from typing import Iterable

from normswap.claims import (  # noqa: F401 (re-exported)
    _HIDDEN_OVERHEAD,
    _JOURNAL_VERSION,
    STAGED_RE,
    _claim_path,
    _claim_wait,
    _exists_quietly,
    _is_special,
    _kind_of,
    _probe_claim,
    _program,
    _resolve,
    _staged_path,
    _start_time,
    check_path_length,
    show_path,
)
from normswap.dataset import IMAGE_SUFFIXES
from normswap.errors import NormswapError
from normswap.journal import _remove_stale_claim, clean_leftovers

try:  # POSIX advisory locks; elsewhere claims fall back to the pid / start-time test
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["OutputSet", "install_signal_handlers", "clean_leftovers", "STAGED_RE", "interrupted_by",
           "check_path_length", "show_path"]

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
        #: OutputSet claimed the name, e.g. save.staged_output under the CLI's run_job)
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
        folders: list[tuple[Path, str, Path]] = []  # input image folders: every image inside is an input
        for label, p in self.inputs:
            ins.setdefault(_resolve(p), (label, p))
            if p.is_dir():
                folders.append((_resolve(p), label, p))
        for opt, p in self.final.items():
            r = _resolve(p)
            shown = show_path(p)
            if r in ins:
                label, src = ins[r]
                raise _err(opt, f"{opt} {shown} is {label} of this run ({show_path(src)}), not a place to write: "
                                f"choose another name (inputs are never overwritten, even with --force)")
            for real, label, src in folders:
                if r.suffix.lower() in IMAGE_SUFFIXES and _inside_image_folder(p, r, src, real):
                    raise _err(opt, f"{opt} {shown} would be an image inside {show_path(src)}, the image folder "
                                    f"this run reads as {label.removeprefix('the ')}: choose a name outside that "
                                    f"folder (inputs are never overwritten, even with --force)")
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
        _pause_before_commit()
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


def _inside_image_folder(p: Path, r: Path, src: Path, real: Path) -> bool:
    """Whether output ``p`` (resolved: ``r``) would be an image of input folder ``src`` (resolved:
    ``real``): under it as written or resolved, or one of the files its scan reads (through a
    symbolic link to elsewhere)."""
    if r.is_relative_to(real) or Path(os.path.abspath(p)).is_relative_to(Path(os.path.abspath(src))):
        return True
    from normswap.images import scan_folder

    try:
        return any(_resolve(f) == r for f in scan_folder(src)["files"])
    except (NormswapError, OSError):
        return False  # an unreadable folder: the job reports it


def _err(opt: str | None, message: str) -> NormswapError:
    """A NormswapError that remembers which option it is about (``e.option``)."""
    e = NormswapError(message)
    e.option = opt
    return e


def _pause_before_commit() -> None:
    """Fail point for the kill tests: ``NORMSWAP_PAUSE_BEFORE_COMMIT=SECONDS`` (at most 60) holds
    a commit that has staged files to move with none of them placed yet, so a test can signal the
    run there every time (a real run passes that point in milliseconds; a poller on a busy 2-core
    machine can miss it). A value that is not a positive number is ignored."""
    raw = os.environ.get("NORMSWAP_PAUSE_BEFORE_COMMIT")
    if not raw:
        return
    try:
        seconds = float(raw)
    except ValueError:
        return
    if seconds > 0:  # (NaN is not)
        time.sleep(min(seconds, 60.0))


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
    claims of every claimed :class:`OutputSet` of the process (the CLI then exits 128 + the signal)."""
    for s in _SIGNALS():
        with contextlib.suppress(ValueError, OSError):
            signal.signal(s, _on_signal)
