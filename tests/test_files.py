"""files.atomic_replace_dir: the one way checkpoints, exports and caches put a finished folder in place."""

from __future__ import annotations

from pathlib import Path

from fastcse.files import atomic_replace_dir


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_new_target_gets_the_tmp_folder(tmp_path):
    tmp = _write(tmp_path / ".tmp-final", {"a.txt": "1", "sub/b.txt": "2"})
    atomic_replace_dir(tmp, tmp_path / "final")
    assert _tree(tmp_path / "final") == {"a.txt": "1", "sub/b.txt": "2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_existing_target_is_replaced_whole(tmp_path):
    _write(tmp_path / "final", {"old-only.txt": "x", "a.txt": "old"})
    tmp = _write(tmp_path / ".tmp-final", {"a.txt": "new"})
    atomic_replace_dir(tmp, tmp_path / "final")
    assert _tree(tmp_path / "final") == {"a.txt": "new"}  # nothing of the old folder survives in it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # the parked old one is gone


def test_a_replacement_killed_half_way_does_not_block_the_next(tmp_path):
    # a crash between the two renames leaves the old target parked under tmp's name + "-old"
    _write(tmp_path / ".tmp-final-old", {"a.txt": "older"})
    _write(tmp_path / "final", {"a.txt": "old"})
    tmp = _write(tmp_path / ".tmp-final", {"a.txt": "new"})
    atomic_replace_dir(tmp, tmp_path / "final")
    assert _tree(tmp_path / "final") == {"a.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
