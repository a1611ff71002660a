"""Every file a run writes is claimed as a whole before any work, written to a hidden staged
file beside its final name, and moved into place only when the whole job succeeded.

Rules (the README's "Loading models safely" section states them for users):

* **Inputs are never touched**: an output may not name an input of the run (model, data,
  the ONNX file being checked), even with ``--force``; nor may two outputs of one run name the
  same file (``-o``, ``--onnx``, ``--json``, ``--report``).
* **Claimed as a whole**: before any work, each final name gets a claim file
  ``.NAME.normswap-claim`` (created exclusively, holding the run's pid).  A second run that
  wants any of the names while the first one runs stops at once with exit 2 and touches
  nothing; without ``--force`` an existing file is refused before any work.
* **Nothing partial**: outputs are written as ``.NAME.normswap-PID.tmp.EXT`` and renamed into
  place together at the end.  Before the renames a journal ``.normswap-commit-PID.json`` lists
  them, so a run killed in the middle of its renames is completed by the next run in that
  folder (never one file of a set without the others).  A failed run removes its staged files
  and claims; SIGTERM is handled like Ctrl-C (see :func:`install_signal_handlers`); the leftovers of
  a SIGKILLed run (staged files, claims of a dead pid) are recognisable by name and removed by
  the next run that writes into the same folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
from pathlib import Path
from typing import Iterable

from normswap.errors import NormswapError

__all__ = ["OutputSet", "install_signal_handlers", "clean_leftovers", "STAGED_RE"]

_CLAIM_SUFFIX = ".normswap-claim"
STAGED_RE = re.compile(r"^\.(?P<name>.+)\.normswap-(?P<pid>\d+)\.tmp(?P<ext>\.[^.]*)?$")
_CLAIM_RE = re.compile(r"^\.(?P<name>.+)\.normswap-claim$")
_JOURNAL_RE = re.compile(r"^\.normswap-commit-(?P<pid>\d+)\.json$")


def _start_time(pid: int) -> str:
    """The process's start time (Linux /proc; '' elsewhere): tells a reused pid from the writer."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return stat.rsplit(")", 1)[1].split()[19]
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
    if start:
        now = _start_time(pid)
        if now and now != start:  # the pid was reused by another process: the writer is gone
            return False
    return True


def _read_claim(path: Path) -> tuple[int, str]:
    try:
        parts = path.read_text().split()
        return int(parts[0]), (parts[1] if len(parts) > 1 else "")
    except (OSError, ValueError, IndexError):
        return 0, ""


def _read_pid(path: Path) -> int:
    return _read_claim(path)[0]


def _claim_alive(path: Path) -> bool:
    pid, start = _read_claim(path)
    if pid == 0:
        # an empty claim is one being created right now (or a crash between create and write):
        # count it alive for a few seconds
        try:
            import time

            return time.time() - path.stat().st_mtime < 5
        except OSError:
            return False
    return _pid_alive(pid, start)


def clean_leftovers(folder: Path) -> list[str]:
    """Complete or remove what killed runs left in ``folder``; returns what was done."""
    done: list[str] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return done
    # 1. journals of dead runs: finish their renames (roll forward), then drop the journal
    for p in entries:
        m = _JOURNAL_RE.match(p.name)
        if not m or _pid_alive(int(m.group("pid"))):
            continue
        try:
            moves = json.loads(p.read_text())
        except (OSError, ValueError):
            moves = []
        for staged, final in moves if isinstance(moves, list) else []:
            s = Path(staged)
            if s.exists():
                with contextlib.suppress(OSError):
                    os.replace(s, final)
                    done.append(f"completed an interrupted write of {final}")
        with contextlib.suppress(OSError):
            p.unlink()
    # 2. staged files and claims of dead runs (a staged file counts as live only while its
    #    writer is alive and still holds the claim on its final name)
    for p in entries:
        m = STAGED_RE.match(p.name)
        if m and p.exists():
            pid = int(m.group("pid"))
            claim = p.with_name(f".{m.group('name')}{m.group('ext') or ''}{_CLAIM_SUFFIX}")
            owner, start = _read_claim(claim) if claim.exists() else (0, "")
            if owner != pid or not _pid_alive(pid, start):
                with contextlib.suppress(OSError):
                    p.unlink()
                    done.append(f"removed {p.name} left by a killed run")
            continue
        m = _CLAIM_RE.match(p.name)
        if m and p.exists() and not _claim_alive(p):
            with contextlib.suppress(OSError):
                p.unlink()
                done.append(f"removed {p.name} left by a killed run")
    return done


class OutputSet:
    """The files one run writes.

    ``outs = OutputSet({"-o": "m.gn.pt", "--onnx": "m.gn.onnx"}, inputs=[model, calib], force=False)``;
    ``outs.claim()`` validates and claims every name before any work;
    ``outs.staged("-o")`` is the hidden path to write that output to;
    ``outs.commit()`` moves every written staged file into place (the set together);
    ``outs.release()`` (always, in ``finally``) removes staged files and claims.  Use it as a
    context manager: ``with OutputSet(...) as outs: ...; outs.commit()``.
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
        self._staged: dict[str, Path] = {}
        self._claims: list[Path] = []
        self.committed: list[Path] = []
        self.notes: list[str] = []

    # ----------------------------------------------------------------- validation + claim

    def validate(self) -> None:
        seen: dict[Path, str] = {}
        ins: dict[Path, tuple[str, Path]] = {}
        for label, p in self.inputs:
            ins.setdefault(_resolve(p), (label, p))
        for opt, p in self.final.items():
            r = _resolve(p)
            if r in ins:
                label, src = ins[r]
                raise _err(opt, f"{opt} {p} is {label} of this run ({src}), not a place to write: choose "
                                    f"another name (inputs are never overwritten, even with --force)")
            if r in seen:
                raise _err(opt, f"{seen[r]} and {opt} would both be {p}; give each output its own file")
            seen[r] = opt
            if p.is_dir():
                raise _err(opt, f"{opt} {p} is a directory, expected a file path")
            parent = p.parent if str(p.parent) else Path(".")
            if not parent.is_dir():
                raise _err(opt, f"{opt} {p}: output folder {parent} does not exist")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise _err(opt, f"{opt} {p}: output folder {parent} is not writable")
            if p.exists() and not self.force:
                raise _err(opt, f"{opt} {p} exists; pass --force to overwrite it")

    def claim(self) -> "OutputSet":
        folders = {(p.parent if str(p.parent) else Path(".")) for p in self.final.values()}
        for f in folders:
            if f.is_dir():
                self.notes.extend(clean_leftovers(f))
        self.validate()
        for opt, p in sorted(self.final.items(), key=lambda kv: str(_resolve(kv[1]))):
            c = p.with_name(f".{p.name}{_CLAIM_SUFFIX}")
            try:
                fd = os.open(c, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = _read_pid(c)
                if pid == os.getpid() and self.share:  # an outer OutputSet of this run holds it
                    continue
                if not _claim_alive(c):  # died after our cleanup pass: take its claim over
                    with contextlib.suppress(OSError):
                        c.unlink()
                    try:
                        fd = os.open(c, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    except OSError:
                        fd = None
                    if fd is not None:
                        self._claims.append(c)
                        with os.fdopen(fd, "w") as fh:
                            fh.write(f"{os.getpid()} {_start_time(os.getpid())}".strip())
                        continue
                self.release()
                raise _err(opt, f"{p} is being written by another normswap run (pid {pid or '?'}); "
                                    f"wait for it or choose another name") from None
            except OSError as e:
                self.release()
                raise _err(opt, f"{opt} {p}: cannot write in {c.parent} ({e.strerror or e})") from None
            self._claims.append(c)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()} {_start_time(os.getpid())}".strip())
        # re-check after claiming: a run that finished in between has written the file
        if not self.force:
            for opt, p in self.final.items():
                if p.exists():
                    self.release()
                    raise _err(opt, f"{opt} {p} exists; pass --force to overwrite it")
        return self

    # ----------------------------------------------------------------- staging + commit

    def staged(self, opt: str) -> Path:
        """The hidden file to write output ``opt`` to (created empty, mode per umask)."""
        if opt not in self.final:
            raise KeyError(opt)
        if opt not in self._staged:
            p = self.final[opt]
            self._staged[opt] = p.with_name(f".{p.stem}.normswap-{os.getpid()}.tmp{p.suffix}")
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
                raise NormswapError(f"{self.final[opt]}: cannot write ({e.strerror or e})") from None
            moves.append((opt, s, self.final[opt]))
        if not moves:
            return []
        if not self.force:
            for _, _, final in moves:
                if final.exists():
                    raise NormswapError(f"{final} exists (created while this run worked); pass --force to overwrite it")
        journals = []
        placed: list[Path] = []
        with _signals_deferred():
            for folder in {f.parent for _, _, f in moves}:
                j = folder / f".normswap-commit-{os.getpid()}.json"
                j.write_text(json.dumps([[str(s), str(f)] for _, s, f in moves if f.parent == folder]))
                journals.append(j)
            try:
                if not self.force:
                    try:
                        for _, s, f in moves:
                            os.link(s, f)  # fails if f exists: never replaces a file we did not create
                            placed.append(f)
                    except FileExistsError as e:
                        for f in placed:
                            with contextlib.suppress(OSError):
                                f.unlink()
                        raise NormswapError(f"{e.filename2 or e.filename} exists (created while this run "
                                            f"worked); nothing was written; pass --force to overwrite it") from None
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
        for s in self._staged.values():
            with contextlib.suppress(OSError):
                s.unlink()
        for c in self._claims:
            with contextlib.suppress(OSError):
                c.unlink()
        self._claims = []

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
    except OSError:
        return p.absolute()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM while the set is renamed into place (a few microseconds)."""
    pending: list[int] = []
    old = {}

    def hold(signum, frame):  # noqa: ARG001
        pending.append(signum)

    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, hold)
    except ValueError:  # not the main thread: signals cannot be handled here
        old = {}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in pending:
            os.kill(os.getpid(), s)


def install_signal_handlers() -> None:
    """Turn SIGTERM (and SIGHUP) into KeyboardInterrupt, like Ctrl-C, so ``finally`` blocks remove
    the staged files and claims of the run (the CLI then exits 130)."""
    def on_term(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, on_term)
