"""Atomic file writes: a temporary file in the target folder, then a rename.

A crash or a full disk leaves either the old file or the new one, never half a
file that a loader would later refuse.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import PathRefused


def atomic_write(path: str | Path, write: Callable[[str], None], overwrite: bool = True) -> Path:
    """Call `write(tmp_path)`, fsync it, then rename it onto `path`.

    With `overwrite=False` the file is linked into place instead, which fails with
    FileExistsError when `path` appeared meanwhile: nothing is ever replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


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
    """Move a fully written folder into place (replacing an older one of the same name)."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


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


def check_file_name(name: str, what: str = "file name") -> str:
    """A name (optionally with sub-folders) that stays inside the folder it is joined to."""
    text = name.strip().replace("\\", "/")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts or text.startswith("/") or ":" in text or ".." in parts:
        raise PathRefused(f"the {what} {name!r} must be a plain name such as 'my_lora' or 'chars/my_lora': "
                          "no absolute path, no ':' and no '..'")
    return "/".join(parts)
