"""Nothing half-written: every file is written to a temporary path beside its target and renamed."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def default_mode(path) -> None:
    """mkstemp makes 0600 files: give the result the permissions a plain open() would (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write(out, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Call write(tmp_path) for a temporary file in out's directory, then rename it to `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=suffix, dir=out.parent)
    os.close(fd)
    try:
        write(tmp)
        default_mode(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def write_json_atomic(out, obj) -> Path:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    return atomic_write(out, write)


def replace_dir(tmp, out) -> Path:
    """Move a completed temporary directory `tmp` to `out`, replacing an existing `out` only after the
    new one is in place (the caller decided it may be replaced)."""
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out
