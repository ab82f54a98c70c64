"""Atomic file writes: a temporary file in the target folder, then a rename.

A crash or a full disk leaves either the old file or the new one, never half a
file that a loader would later refuse.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Callable

from .errors import DiskFull, PathRefused

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path: str | Path, write: Callable[[str], None], overwrite: bool = True) -> Path:
    """Call `write(tmp_path)`, fsync it, then rename it onto `path`.

    With `overwrite=False` the file is linked into place instead, which fails with
    FileExistsError when `path` appeared meanwhile: nothing is ever replaced.
    """
    path = Path(path)
    try:
        _make_folder(path.parent, path)
        tmp, mode = _new_temp_file(path)
    except OSError as e:
        if out_of_space(e):
            raise disk_full(path) from None
        raise
    try:
        write(tmp)
        os.chmod(tmp, mode)  # the writer may have made a file of its own (safetensors does, as 0600)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if out_of_space(e):
            raise disk_full(path) from None
        raise
    return path


def _make_folder(folder: Path, target: Path) -> None:
    """`folder` and its parents; a part of it that exists as a file is named in the error."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in [*reversed(folder.parents), folder] if os.path.lexists(p) and not p.is_dir()),
                        folder)
        raise PathRefused(f"{target} cannot be written: {blocking} is a file, not a folder, so nothing can be saved "
                          "inside it; choose a name whose folders are not existing files") from None


def _new_temp_file(path: Path) -> tuple[str, int]:
    """An empty temporary file beside `path`, and the permissions an ordinary open() gave it (0666 less the
    umask). mkstemp's 0600 would follow the file through the rename and hide it from other users."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        try:
            return str(tmp), stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


def disk_full(target: Path) -> DiskFull:
    return DiskFull(f"the disk is full: {target} could not be written ({free_space(target.parent)} free there); "
                    "nothing was replaced. Free some space (or point the output elsewhere) and run again")


def out_of_space(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in _NO_SPACE
    # safetensors' writer (Rust) reports the OS error as text: "... (os error 28)"
    return any(f"(os error {n})" in str(e) for n in _NO_SPACE)


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` survive a power cut (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown space"


def atomic_write_text(path: str | Path, text: str) -> Path:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    return atomic_write(path, write)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    def write(tmp: str) -> None:
        Path(tmp).write_bytes(data)

    return atomic_write(path, write)


def save_safetensors_atomic(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None,
                            overwrite: bool = True) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=overwrite)


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written folder into place. An older folder of the same name is moved aside first
    and deleted only after the new one is in place (`restore_set_aside` undoes a kill in between)."""
    aside = None
    if final_dir.exists():
        aside = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        os.replace(final_dir, aside)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def restore_set_aside(folder: Path) -> None:
    """Put back folders that `publish_dir` moved aside when it was stopped before the new one was in place."""
    for aside in folder.glob(".*.old-*"):
        final = folder / aside.name[1:].rsplit(".old-", 1)[0]
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, final)


def resolve_within(user_path: str, roots: list[Path], what: str, base: Path | None = None) -> Path:
    """`user_path` made absolute (relative ones from `base`, default the first root) and
    checked to lie inside one of `roots`; links and `..` are resolved before the check."""
    text = user_path.strip()
    if not text:
        raise PathRefused(f"the {what} is empty; give a path inside {roots[0]}")
    p = Path(text).expanduser()
    if not p.is_absolute():
        p = (base or roots[0]) / p
    resolved = p.resolve()
    for root in roots:
        if resolved == root.resolve() or resolved.is_relative_to(root.resolve()):
            return resolved
    raise PathRefused(
        f"the {what} {text!r} is outside the folders this trainer may use ({', '.join(str(r) for r in roots)}); "
        "move it there or add its folder to the allow-list (see README: allowed folders)"
    )


# Refused in names on Windows or by ComfyUI's file lists; control characters anywhere.
_RESERVED_CHARACTERS = set('<>:"|?*\x7f')
_RESERVED_NAMES = {"con", "prn", "aux", "nul", "conin$", "conout$",
                   *(f"{d}{i}" for d in ("com", "lpt") for i in [*"123456789", "\u00b9", "\u00b2", "\u00b3"])}


def check_file_name(name: str, what: str = "file name") -> str:
    """A name (optionally with sub-folders) that stays inside the folder it is joined to and is
    a valid file name on Linux, macOS and Windows alike."""
    text = name.strip().replace("\\", "/")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts or text.startswith("/") or ".." in parts:
        raise PathRefused(f"the {what} {name!r} must be a plain name such as 'my_lora' or 'chars/my_lora': "
                          "no absolute path and no '..'")
    bad = sorted({c for c in text if c in _RESERVED_CHARACTERS or ord(c) < 32})
    if bad:
        shown = " ".join(repr(c) if ord(c) >= 32 else f"\\x{ord(c):02x}" for c in bad)
        raise PathRefused(f"the {what} {name!r} contains {shown}, which file names may not hold; "
                          "use letters, digits, spaces, '-', '_' and '.'")
    for part in parts:
        if part.split(".")[0].lower() in _RESERVED_NAMES or part.endswith((".", " ")):
            raise PathRefused(f"the {what} {name!r} has the part {part!r}, which Windows reserves "
                              "(CON, NUL, COM1, ..., or a trailing dot or space); choose another name")
    return "/".join(parts)
