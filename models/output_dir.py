"""Where a command writes its result (``--out``): checked before anything loads, held by one process at a time,
written whole or not at all. Every command that writes a directory (train, merge, quantize, compare,
convert-gguf) goes through this file.

The rules:

* ``--out`` must not be a file, nor equal to, inside of, or around one of the command's inputs (writing there
  would destroy them).
* A non-empty ``--out`` is refused unless it is the command's own (a resumed training run) or ``--overwrite``
  is given: a merged model, an adapter, another run or a user's own folder is never replaced unasked.
* The location must be writable; this is tried (a probe file) before any model or data is read, so a run
  does not fail only when it saves.
* One process at a time: ``OutputLock`` holds ``fcntl.flock`` on ``<parent>/.<name>.lock``, a file naming the
  holder (pid, host, command, start time). A second process fails at once naming it. The kernel drops the lock
  when its process dies, so the file of a killed process is taken over (and said so).
* Results are written into a temporary sibling directory (``staging_dir``) and renamed into place
  (``replace_dir``): a failed or interrupted write leaves the previous state, never a half result under the
  final name. A training run, written in place as it goes, keeps what it replaces until it has written
  something (``replaced_when_written``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .checkpoint import make_readable

OVERWRITE_FLAG = "--overwrite"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move directory ``tmp`` to ``final``; an existing ``final`` is moved aside first and then deleted, so at
    every moment ``final`` is either the old directory or the whole new one."""
    trash = None
    if final.exists():
        trash = final.parent / f".trash-{final.name}-{os.getpid()}"
        os.replace(final, trash)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _describe_contents(out: Path, limit: int = 4) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def check_output_dir(out: str | Path, inputs: Iterable[str | Path | None] = (), *, overwrite: bool = False,
                     own: bool = False, flag: str = "--out",
                     explain: Callable[[Path], str | None] | None = None) -> Path:
    """The checks of ``--out`` a command makes before it reads anything (see the module docstring).

    Args:
        inputs: the directories and files the command reads.
        own: ``out`` is this command's own (e.g. the run being resumed): it may hold files.
        explain: for a non-empty ``out``, an optional sentence saying what it holds and what to do instead.

    Raises:
        ValueError: naming ``flag`` and what is wrong: a file, an input, not empty, not writable.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out} is a file; give a directory")
    target = out.resolve()
    for src in inputs:
        if src is None or not Path(src).exists():
            continue
        source = Path(src).resolve()
        if target == source:
            raise ValueError(f"{flag} {out} is also an input ({src}); write the result to another directory")
        if source in target.parents:
            raise ValueError(f"{flag} {out} is inside the input {src}; write the result outside it")
        if target in source.parents:
            raise ValueError(f"{flag} {out} contains the input {src}; write the result to another directory")
    if out.is_dir() and not own and any(out.iterdir()) and not overwrite:
        what = (explain(out) if explain else None) or f"it holds {_describe_contents(out)}"
        raise ValueError(f"{flag} {out} is not empty ({what}); choose another {flag}, or add {OVERWRITE_FLAG} to "
                         "replace it")
    check_writable(out, flag)
    return out


def check_writable(out: Path, flag: str = "--out") -> None:
    """Create ``out``'s parent and write (then delete) a probe file there and in ``out`` if it exists.

    Raises:
        ValueError: naming ``flag``, the path and the system's reason.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for where in (out.parent, out) if out.is_dir() else (out.parent,):
            fd, probe = tempfile.mkstemp(dir=where, prefix=".write-test-")
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise _cannot_write(out, err, flag) from None


def _cannot_write(out: Path, err: OSError, flag: str) -> ValueError:
    """The one-line error for an ``out`` that cannot be created or written, with the system's reason (or the
    ancestor that is a file, which the system calls "File exists" or "Not a directory")."""
    above = next((p for p in (out, *out.parents) if p.exists() or p.is_symlink()), None)
    reason = f"{above} is a file" if above is not None and not above.is_dir() else (err.strerror or str(err))
    return ValueError(f"{flag} {out}: cannot write there ({reason}); choose a writable directory")


def staging_dir(out: Path) -> Path:
    """A new empty directory beside ``out`` to write the result into before ``replace_dir`` renames it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    make_readable(tmp)  # mkdtemp makes it 0700; a result directory should read like any other
    return tmp


@contextmanager
def written_whole(out: str | Path) -> Iterator[Path]:
    """``with written_whole(out) as tmp:`` write the result into ``tmp``; on success it replaces ``out``, on an
    exception (or Ctrl-C) ``tmp`` is deleted and ``out`` is as it was."""
    out = Path(out)
    tmp = staging_dir(out)
    try:
        yield tmp
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def replaced_when_written(out: str | Path) -> Iterator[None]:
    """``--overwrite`` of a result written in place as it goes (a training run's checkpoints and record), where
    ``written_whole`` cannot stage it: the previous contents of ``out`` are moved into a hidden sibling
    (``.<name>.replaced-*``, named on stderr), deleted once the new run has written something into ``out``, and
    moved back when it fails or is interrupted before writing anything (e.g. on a flag only checked once the model
    is loaded). Where they cannot be moved (``out`` is a mount point, or a link to another filesystem) they are
    deleted in place, as asked. A process killed in between leaves them in that sibling."""
    out = Path(out)
    if not out.is_dir() or not any(out.iterdir()):
        yield
        return
    aside = _set_aside(out)
    try:
        yield
    finally:
        if aside is not None and any(out.iterdir()):  # the new result has begun: the old one is replaced, as asked
            shutil.rmtree(aside, ignore_errors=True)
        elif aside is not None:
            _move_all(aside, out)
            aside.rmdir()
            print(f"note: {out} keeps its previous contents: the new run stopped before writing anything",
                  file=sys.stderr)


def _move_all(src: Path, dst: Path) -> None:
    for path in list(src.iterdir()):
        os.rename(path, dst / path.name)  # the same filesystem: a rename, nothing copied


def _set_aside(out: Path) -> Path | None:
    """Move ``out``'s contents into a new hidden sibling of its real location and return it; where a rename cannot
    do it, put back what moved, delete the contents in place and return None."""
    real = out.resolve()
    try:
        aside = Path(tempfile.mkdtemp(prefix=f".{real.name}.replaced-", dir=real.parent))
    except OSError:  # the parent is not writable
        aside = None
    if aside is not None:
        try:
            _move_all(real, aside)
            print(f"note: the previous contents of {out} are kept in {aside} until the new run writes its first "
                  "file", file=sys.stderr)
            return aside
        except OSError:  # e.g. EXDEV: out is a mount point
            _move_all(aside, real)
            aside.rmdir()
    for path in real.iterdir():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return None


# ---------------------------------------------------------------------------------------------------------
# One process per output directory.
# ---------------------------------------------------------------------------------------------------------
def lock_path(out: Path) -> Path:
    """``<parent>/.<name>.lock``: beside ``out``, so that it also guards a directory that is renamed into place."""
    return out.parent / f".{out.name}.lock"


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']} since {h['started']}: {h['command']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "another process"


class OutputLock:
    """``with OutputLock(out, flag="--out"):`` the only process writing ``out`` (see the module docstring).

    Raises (on entry):
        ValueError: another live process holds it (named), or the lock file cannot be created.
    """

    def __init__(self, out: str | Path, flag: str = "--out", command: str | None = None):
        self.out, self.flag = Path(out), flag
        self.command = command or " ".join(["finetune", *sys.argv[1:]])
        self.path = lock_path(self.out)
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.fd = self._acquire()
        except OSError as err:
            raise _cannot_write(self.out, err, self.flag) from None
        return self

    def _acquire(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with open(fd, closefd=True) as f:
                    holder = _holder(f.read())
                raise ValueError(f"{self.flag} {self.out} is in use by {holder}; wait for it to finish or stop "
                                 f"it, or choose another {self.flag}") from None
            try:  # the previous holder may have deleted the file between our open and flock: lock the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        if previous.strip():  # left by a process that died holding it: the kernel released its flock
            print(f"note: taking over the lock of {self.out} left by a process that is gone ({_holder(previous)})",
                  file=sys.stderr)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return fd

    def __exit__(self, *exc) -> bool:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # before unlocking: a waiter then re-opens a fresh file (see _acquire)
            except FileNotFoundError:
                pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        return False


def publish_files(tmp: Path, out: Path) -> None:
    """Move every entry of directory ``tmp`` into ``out`` (each by an atomic rename; weight files last, so a
    crash in between leaves a result without weights, which loaders refuse), then remove ``tmp``.

    A sub-directory (e.g. the 4-bit base a LoftQ/OLoRA adapter is saved with) replaces one of the same name from an
    earlier write of this run (a resumed or extended run): a rename cannot replace a non-empty directory, so the
    old one is renamed aside first and removed after."""
    for path in sorted(tmp.iterdir(), key=lambda p: (p.suffix == ".safetensors", p.name)):
        target = out / path.name
        if path.is_dir() and target.is_dir():
            old = out / f".{path.name}.replaced"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(path, target)
            shutil.rmtree(old)
        else:
            os.replace(path, target)
    fsync_dir(out)
    tmp.rmdir()
