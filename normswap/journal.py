"""Leftovers of killed runs: journals completed within strict rules, staged files and unlocked
claims removed (the rules: :mod:`normswap.outputs`' docstring, "Nothing partial")."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Iterable

from normswap.claims import (
    _CLAIM_RE,
    _CLAIM_SUFFIX,
    _JOURNAL_RE,
    _JOURNAL_VERSION,
    _NONCE_RE,
    STAGED_RE,
    _is_protected,
    _kind_of,
    _owned_regular,
    _pid_alive,
    _plain_name,
    _Probe,
    _probe_claim,
    _protected_set,
    _read_small,
    _resolve,
    _staged_path,
    fcntl,
    show_path,
)

__all__ = ["clean_leftovers"]


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
