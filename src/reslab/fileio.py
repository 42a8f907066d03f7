"""Files that are either whole or absent: atomic writes and JSON-lines logs."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch

from .errors import SpecError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file; mkstemp's temp files are 0600


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` via a temp file in the same folder, fsync, then rename.

    Readers (and a process killed mid-write) see the old file or the whole new
    one, never a torn one.  ``write`` receives the open binary file.  The file
    gets the mode a plain ``open()`` would give it (0644 under the usual umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
            tmp = f.name
            write(f)
            f.flush()
            os.fchmod(f.fileno(), _FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete JSON object in a JSON-lines file (a torn last line is dropped)."""
    rows = []
    file = Path(path)
    if not file.is_file():
        return rows
    for line in file.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a crash; everything after it is suspect too
    return rows


def append_jsonl(path: str | os.PathLike, *rows: dict[str, Any]) -> None:
    """Append each object as one line and fsync, so a crash loses at most these rows."""
    with open(path, "a") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


def rewrite_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why a directory ``path`` could not be created (or written into), or None if it can.

    Walks up to the nearest folder that exists and makes (then removes) a temporary
    folder there: a parent that is a file, a read-only place, or a file system that
    refuses new entries (``/proc``) all show up before any work, with nothing left behind.
    """
    target = Path(path)
    existing = target
    while not existing.exists():
        if existing.parent == existing:
            return f"{str(existing)!r} does not exist"
        existing = existing.parent
    if not existing.is_dir():
        return f"{str(existing)!r} is a file, not a directory"
    try:
        probe = tempfile.mkdtemp(prefix=".reslab-probe-", dir=existing)
    except OSError as exc:
        return f"{str(existing)!r} does not accept new files ({exc.strerror or type(exc).__name__})"
    os.rmdir(probe)
    return None


def require_writable_dir(folder: str | os.PathLike, flag: str, given: str | None = None) -> None:
    """A one-line SpecError where ``folder`` cannot be created or written into (see
    :func:`unwritable_reason`); the message names ``given`` (what was typed) or the folder."""
    problem = unwritable_reason(folder)
    if problem is not None:
        raise SpecError(f"{flag} {given or repr(str(folder))} cannot be written: {problem}")
def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def source_file_of(obj: Any) -> Path | None:
    """The resolved file that defines ``obj`` (a class or function), or None where Python cannot
    tell (a builtin, code typed into a REPL)."""
    try:
        file = inspect.getsourcefile(obj)
    except TypeError:
        return None
    return Path(file).resolve() if file and Path(file).is_file() else None


