"""Writing a command's output folder safely: never over its source, never half-written.

:func:`check_output_folder` runs before any work (so a mistake costs nothing) and
:func:`atomic_folder` writes into a temporary sibling folder that replaces the output only once
everything is written: an interrupted run leaves no loadable output, and an existing output is
replaced only with ``overwrite``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_folder(out: str | os.PathLike[str], sources: Sequence[str | os.PathLike[str]] = (), *,
                        overwrite: bool = False) -> Path:
    """``out`` resolved; ValueError when it is, lies inside or contains a local source folder, is not a
    folder, or is a non-empty folder and ``overwrite`` is false."""
    target = Path(out).resolve()
    for source in sources:
        src = Path(source)
        if not src.exists():
            continue  # a Hub id, not a local folder
        src = src.resolve()
        if _inside(target, src) or _inside(src, target):
            raise ValueError(f"output folder {out} overlaps the source {source}: write the compressed model elsewhere "
                             "(the source is never modified)")
    if target.exists() and not target.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ValueError(f"output folder {out} exists and is not empty: pass --overwrite to replace it")
    return target


@contextmanager
def atomic_folder(out: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``out``; when the block succeeds it becomes ``out`` (an
    existing ``out`` is replaced only with ``overwrite``), when it fails or is interrupted it is removed."""
    target = Path(out).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield temporary
        if target.is_dir() and any(target.iterdir()) and not overwrite:
            raise ValueError(f"output folder {out} appeared while writing and is not empty: pass --overwrite to replace it")
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
        os.replace(temporary, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
