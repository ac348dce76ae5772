"""Nothing half-written: every file is written to a temporary path beside its target and renamed.
Temporary names carry the writer's pid (`.NAME.PID.XXXX.tmp`, `.NAME.old-PID`), so that a later run
can remove what a killed one left, and never what a live one is writing."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from .errors import ActVarError

_WHY = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
        errno.ENOTDIR: "a path component is not a directory", errno.EISDIR: "is a directory",
        errno.EFBIG: "file too large for this file system or limit"}


def os_error_in(e: BaseException) -> Optional[OSError]:
    """The OSError behind `e` (itself, or its cause/context: torch wraps a failed write in RuntimeError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def reason(e: OSError) -> str:
    return _WHY.get(e.errno, e.strerror or type(e).__name__)


def write_error(e: OSError, path) -> ActVarError:
    """One line naming the path being written and the reason."""
    return ActVarError(f"{path}: cannot write: {reason(e)}")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(path) -> None:
    """mkstemp/mkdtemp make 0600/0700: give the result the permissions a plain open()/mkdir() would."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask())


def temp_prefix(out: Path) -> str:
    return f".{out.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out: Path) -> None:
    """Remove temporary files/directories of this tool beside `out` whose creating process is gone."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    pat = re.compile(rf"^\.{re.escape(out.name)}\.(?:(\d+)\.[^.]+\.tmp|old-(\d+))$")
    for p in out.parent.iterdir():
        m = pat.match(p.name)
        if m and not _alive(int(m.group(1) or m.group(2))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def atomic_write(out, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) for a temporary file in out's directory, then rename it to `out`.
    A failed write (full disk, unwritable directory) is one ActVarError naming `out`."""
    out = Path(out)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(out), suffix=".tmp", dir=out.parent)
        os.close(fd)
        write(tmp)
        default_mode(tmp)
        os.replace(tmp, out)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        ose = os_error_in(e)
        if ose is not None and not isinstance(e, ActVarError):
            raise write_error(ose, out) from None
        raise
    return out


def write_json_atomic(out, obj) -> Path:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    return atomic_write(out, write)


def temp_dir(out) -> Path:
    """A new temporary directory beside `out` (`.NAME.PID.XXXX.tmp`, a plain mkdir's permissions) to be
    renamed to `out` with `replace_dir`; stale ones of dead writers are removed first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), suffix=".tmp", dir=out.parent))
    default_mode(tmp)
    return tmp


def replace_dir(tmp, out) -> Path:
    """Move a completed temporary directory `tmp` to `out`. An existing `out` (the caller decided it may be
    replaced) is moved aside first and removed only once the new one is in place; if the rename fails, it is
    put back."""
    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        tmp.rename(out)
        return out
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out
