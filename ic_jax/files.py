"""Files the user names: their text read as checked UTF-8, and where results go (checks made before any work,
atomic writes, replacing a folder without a moment when it is missing).

Every write goes to a hidden sibling named `.NAME.tmp-PID-TOKEN` first and is then renamed into place, so an
interrupted command leaves either the old result or the new one. A folder is swapped in with one atomic
exchange where the system has one (Linux renameat2, macOS renamex_np), else it is renamed aside first. What an
interrupted write leaves behind (`.NAME.tmp-*`, `.NAME.old-*` of a process no longer alive) is removed by the
next write to NAME. Files and folders get the user's umask, like any file the user creates.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import re
import secrets
import shutil
import sys
from pathlib import Path

from ic_jax.errors import UserError

CHECKPOINT_FILES = ("config.json", "meta.json")  # with params/: what makes a folder an ic_jax checkpoint


# ----------------------------------------------------------------------------------------------------------
# reading what the user gives


def decode_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); "
                        f"convert it, e.g. with iconv -t utf-8") from None


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of a file the user named; `what` names it in the error ("prompt file x.txt")."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} not found")
    if not path.is_file():
        raise UserError(f"{what} is not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{what} cannot be read ({e.strerror})") from None
    return decode_utf8(data, what)


def read_stdin() -> str:
    return decode_utf8(sys.stdin.buffer.read(), "standard input")


# ----------------------------------------------------------------------------------------------------------
# checks made before any work


def check_output_file(path: str | Path, flag: str) -> Path:
    """`path` as a Path, after checking that a file can be written there; creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name, e.g. {flag} {path / 'out.json'}")
    _check_parent(path, flag)
    return path


def claim_output_dir(path: str | Path, flag: str, *, settings: dict | None = None, overwrite: bool = False) -> Path:
    """`path` as a Path, after checking that a checkpoint may be written there: nothing is there yet, or an
    ic_jax checkpoint of this run (its meta.json "settings" equal `settings`; any checkpoint when None), or
    `overwrite` is set. The current folder, its ancestors, the home folder and / are never replaced."""
    path = Path(path)
    _refuse_protected(path, flag)
    _check_parent(path, flag)
    if overwrite or not os.path.lexists(path):
        return path
    if not path.is_dir():
        raise UserError(f"{flag} {path} is an existing file; choose another {flag} or pass --overwrite to replace it")
    if is_checkpoint(path) and (settings is None or _saved_settings(path) == _as_json(settings)):
        return path
    if next(path.iterdir(), None) is None:
        return path
    files = sum(len(names) for _, _, names in os.walk(path))
    holds = f"{files} file" + ("" if files == 1 else "s")
    raise UserError(f"{flag} {path} exists and is not a checkpoint of this run (it holds {holds}); "
                    f"choose another {flag} or pass --overwrite to replace it")


def is_checkpoint(path: Path) -> bool:
    return all((path / name).is_file() for name in CHECKPOINT_FILES) and (path / "params").is_dir()


def _saved_settings(path: Path):
    try:
        return (read_json(path / "meta.json", "meta.json", fix="") or {}).get("settings")
    except UserError:  # damaged: not recognisably this run
        return None


def _as_json(value):
    """`value` as it reads back from JSON (tuples become lists), for comparing with saved settings."""
    return json.loads(json.dumps(value))


def _check_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of `path` must be a folder this process may write in."""
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{flag} {path}: {ancestor} is a file, not a folder; choose another {flag}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: no permission to write in {ancestor}; choose another {flag}")


def _refuse_protected(path: Path, flag: str) -> None:
    """Replacing the current folder, the home folder, or a folder holding either would delete the user's work."""
    target = path.resolve()
    for place, name in ((Path.cwd().resolve(), "the current folder"), (Path.home().resolve(), "the home folder")):
        if target == place or target in place.parents:
            what = name if target == place else f"an ancestor of {name}"
            what = "the root folder" if target.parent == target else what
            raise UserError(f"{flag} {path} is {what}, which is never replaced; "
                            f"give a folder of its own, e.g. {flag} {path / 'run'}")


# ----------------------------------------------------------------------------------------------------------
# writing


def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes `text` (UTF-8) to `path` through a synced temporary sibling and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = _sibling(path, "tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def new_temp_dir(path: Path) -> Path:
    """A fresh hidden folder beside `path` to build a replacement in (see `publish_dir`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = _sibling(path, "tmp")
    tmp.mkdir(0o777)  # the kernel applies the umask
    return tmp


def publish_dir(tmp: Path, path: Path) -> None:
    """Puts the finished folder `tmp` at `path`, replacing what is there with no moment without either."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
    elif _exchange(tmp, path):
        remove_path(tmp)  # now holds the old content
    else:
        old = _sibling(path, "old")
        os.rename(path, old)
        os.rename(tmp, path)
        remove_path(old)


def remove_leftovers(path: Path) -> None:
    """Removes what interrupted writes to `path` left beside it; an old copy whose replacement never arrived
    is put back first."""
    dead = [p for p in path.parent.glob(f".{glob.escape(path.name)}.*-*") if _leftover_of_dead_process(p, path)]
    if not os.path.lexists(path):
        old = [p for p in dead if p.name.startswith(f".{path.name}.old-")]
        if old:
            os.rename(old[0], path)
            dead.remove(old[0])
    for p in dead:
        remove_path(p)


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _leftover_of_dead_process(p: Path, path: Path) -> bool:
    m = re.fullmatch(rf"\.{re.escape(path.name)}\.(?:tmp|old)-(\d+)(?:-\w+)?", p.name)
    return m is not None and not _alive(int(m[1]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_path(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths; False where the system or the file system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), ctypes.c_uint(2))  # RENAME_SWAP
    elif sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), ctypes.c_uint(rename_exchange))
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # not on this file system
        return False
    raise OSError(err, os.strerror(err), str(b))


# ----------------------------------------------------------------------------------------------------------
# reading back what a command wrote


def read_json(path: str | Path, what: str, *, fix: str, keys: tuple[str, ...] = ()) -> dict | None:
    """The JSON object in `path` (None when there is no file): a damaged file, not UTF-8, not an object or
    without one of `keys`, is one UserError naming `what` and `fix`."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise UserError(f"{what} cannot be read ({e.strerror}); {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} is damaged (not UTF-8 text); {fix}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{what} is damaged (invalid JSON, line {e.lineno}: {e.msg}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} is damaged (not a JSON object); {fix}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise UserError(f"{what} is damaged (no {', '.join(missing)}); {fix}")
    return data
