"""File helpers shared by every command: atomic writes and row-precise input errors.

Every output file is written to a temporary sibling and renamed into place, so a killed
process leaves either the previous file or the complete new one, never half of it. An output
path that is a symlink is written through: the temporary file goes next to the link's target and
replaces the target, so the link stays a link. Directories, FIFOs and devices are never replaced.
New files and directories get the permissions the umask gives (not mkstemp's 0600 / 0700).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """Bad user input, located to a file, a line (1-based) and a field.

    `str(err)` is the one-line message the CLI prints: `FILE:LINE: field 'x' ...`.
    """

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


# Errors of the file system a user can fix (a path, a permission, a full disk); anything else
# is an internal error and keeps its traceback.
USER_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EACCES,
        errno.EPERM,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.EEXIST,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.ENAMETOOLONG,
        errno.ELOOP,
        errno.EFBIG,
    }
)
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from, reports a full disk or quota.

    torch.save turns the ENOSPC of its writer into a RuntimeError ("unexpected pos") whose
    context is the OSError; safetensors reports it as text ("os error 28").
    """
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return True
        if "No space left on device" in str(error) or "os error 28" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def write_error(path: str | os.PathLike, exc: BaseException) -> InputError:
    """The one-line error for a failed write of `path`, saying plainly when the disk is full."""
    if disk_full(exc):
        return InputError(path, None, "no space left on device (the previous version is kept)")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return InputError(path, None, f"cannot write: {reason}")


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's content; a missing file or a byte that is not UTF-8 is an InputError."""
    data = _read_bytes(Path(path))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise InputError(path, line, _not_utf8(data[e.start], column)) from None


def _read_bytes(path: Path) -> bytes:
    _check_readable(path)
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(path, None, f"cannot read: {e.strerror}") from None


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise InputError(path, None, "file not found")
    if path.is_dir():
        raise InputError(path, None, "is a directory, not a file")


def _not_utf8(byte: int, column: int) -> str:
    return f"not UTF-8 text: byte 0x{byte:02x} at column {column}"


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, object) for each line; blank lines, bad UTF-8 and bad JSON raise
    InputError naming the line (lines are counted by "\\n", as editors count them)."""
    path = Path(path)
    _check_readable(path)
    try:
        f = path.open("rb")
    except OSError as e:
        raise InputError(path, None, f"cannot read: {e.strerror}") from None
    with f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(path, line_no, _not_utf8(raw[e.start], e.start + 1)) from None
            if not line.strip():
                raise InputError(path, line_no, "blank line (expected one JSON object per line)")
            row = parse_json(line, path, line_no)
            if not isinstance(row, dict):
                raise InputError(path, line_no, "expected a JSON object")
            yield line_no, row


def parse_json(text: str, path: str | os.PathLike, line: int | None) -> Any:
    """`json.loads(text)`; every failure (syntax, nesting depth, huge integers) an InputError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = line if line is not None else e.lineno
        raise InputError(path, where, f"invalid JSON: {e.msg}") from None
    except RecursionError:
        raise InputError(path, line, "invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer longer than sys.get_int_max_str_digits()
        raise InputError(path, line, f"invalid JSON: {e}") from None


def check_output_path(path: str | os.PathLike) -> Path:
    """The file a write of `path` replaces (a symlink's target), checked before any work.

    Raises InputError for an empty path, a directory, a FIFO, socket or device, a path under a
    file, or a directory that cannot be written.
    """
    if not str(path):
        raise InputError("''", None, "empty output path")
    target = Path(os.path.realpath(path))
    if target.is_symlink():  # realpath stops at a symlink loop
        raise InputError(path, None, "symlink loop")
    if target.exists():
        mode = target.stat().st_mode
        if stat.S_ISDIR(mode):
            raise InputError(path, None, "is a directory; give a file name")
        if not stat.S_ISREG(mode):
            raise InputError(
                path, None, "not a regular file (a FIFO, socket or device); refusing to replace it"
            )
    _check_directory_writable(path, target.parent)
    return target


def check_output_dir(path: str | os.PathLike) -> Path:
    """A directory outputs will be written under (created if missing), checked before any work."""
    if not str(path):
        raise InputError("''", None, "empty output directory")
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_dir():
        raise InputError(path, None, "exists and is not a directory")
    _check_directory_writable(path, target)
    return target


def _check_directory_writable(shown: str | os.PathLike, directory: Path) -> None:
    """`directory`, or the nearest existing ancestor it would be created under, is writable."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(shown, None, f"{existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(shown, None, f"permission denied: cannot write in {existing}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary file next to `path` (its target, for a symlink); on clean exit fsync it
    and rename it over that file. An existing file keeps its permissions; a new one gets the
    umask's. A failed write (full disk, permissions) raises InputError naming `path`."""
    target = check_output_path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        permissions = (
            stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~_umask()
        )
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        raise write_error(path, e) from e
    os.close(fd)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, permissions)
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in USER_ERRNOS:
            raise write_error(path, e) from e
        raise


def json_ready(value: Any) -> Any:
    """JSON has no inf or NaN: turn them into null, recursively, so output stays strict JSON."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on clean exit it replaces `path` as a whole.

    The old directory is moved aside before the rename and deleted after, so at every
    instant either the old or the new complete directory exists under a known name
    (`path` or `path.old`); `recover_directory` restores the old one after a crash, and
    `remove_stale_temporaries` deletes the temporary directory a kill leaves behind. A full disk
    raises InputError saying so.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and disk_full(e):
            raise write_error(path, e) from e
        raise


def recover_directory(path: str | os.PathLike) -> None:
    """Undo a crash between the two renames of `atomic_directory`."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if old.exists() and not path.exists():
        os.replace(old, path)
    elif old.exists():
        shutil.rmtree(old)


def remove_stale_temporaries(directory: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete what a killed `atomic_directory` / `atomic_open` of `directory/NAME` left behind
    (`.NAME.*.tmp`), for each NAME; returns the removed paths."""
    removed = []
    for name in names:
        for tmp in Path(directory).glob(f".{name}.*.tmp"):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
