"""Folders written so that a crash at any moment leaves either the old one or the new one.

The one home of atomic folder replacement: checkpoints, the training program's exports and the
fallback-tokenizer cache all write into a temporary sibling folder, then call
:func:`atomic_replace_dir`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (the names created or renamed in it) to disk."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file below ``path`` and every folder's entries, ``path`` itself last."""
    for dirpath, dirnames, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for name in dirnames:
            fsync_dir(Path(dirpath) / name)
    fsync_dir(Path(path))


def atomic_replace_dir(tmp: Path, target: Path) -> None:
    """Put the complete folder ``tmp`` in place of ``target`` (which may not exist).

    ``tmp`` must be a sibling of ``target`` (a rename is only atomic within one file system). Its
    contents are flushed to disk before any rename, so a power cut never leaves a ``target`` whose
    files are empty. An existing ``target`` is first renamed to ``tmp``'s name + ``-old``: whoever
    cleans up stale temporary folders after a crash (``checkpoint.save_checkpoint`` globs them)
    also finds that one. Between the two renames ``target`` is briefly absent; it is never partial.
    """
    tmp, target = Path(tmp), Path(target)
    fsync_tree(tmp)
    old = tmp.with_name(tmp.name + "-old")
    shutil.rmtree(old, ignore_errors=True)  # left by a replacement that was killed half-way
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    fsync_dir(target.parent)  # the renames themselves survive a crash
    shutil.rmtree(old, ignore_errors=True)
