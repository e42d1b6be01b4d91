"""What `bgq ingest` reads: a folder walked recursively, or a CSV/JSONL manifest, as Items.

Every Item says which file to read and where its PNG goes under the output folder. Output
names never leave that folder: ids and paths with `..`, absolute paths or NUL are refused.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bgq.errors import ConfigError, PermanentError

MANIFEST_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class Item:
    """One input: the file to read, its output path relative to DIR, and why it cannot run."""

    source: str
    output: str | None
    id: str | None = None
    error: str | None = None


class InputError(PermanentError):
    """One input cannot be read (missing, not a regular file, unreadable)."""


def read_file(source: str) -> bytes:
    """The bytes of a local input; InputError says why not."""
    path = Path(source)
    if path.exists() and not path.is_file():
        raise InputError("not a regular file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}") from None


def open_catalog(src: Path, exclude: Path | None = None) -> tuple[int, Iterator[Item]]:
    """The number of inputs and a stream of them; a bad SRC raises ConfigError (usage error)."""
    if src.is_dir():
        return _count_files(src, exclude), walk_folder(src, exclude)
    if not src.is_file():
        raise ConfigError(f"no such folder or manifest: {src}")
    if src.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ConfigError(f"{src}: a manifest must be a .csv or .jsonl file (or give a folder)")
    items = read_manifest(src)
    return len(items), iter(items)


def _visible(names: list[str]) -> list[str]:
    return sorted(name for name in names if not name.startswith("."))


def _walk(root: Path, exclude: Path | None) -> Iterator[tuple[Path, list[str]]]:
    """(folder, visible file names) in a stable order; hidden entries and `exclude` skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in _visible(dirnames) if exclude is None or here / d != exclude]
        yield here, _visible(filenames)  # links and special files too: ingest reports them


def _count_files(root: Path, exclude: Path | None) -> int:
    return sum(len(files) for _, files in _walk(root, exclude))


def walk_folder(root: Path, exclude: Path | None = None) -> Iterator[Item]:
    """Every visible file under `root` (images are told by content later, not by extension)."""
    for folder, files in _walk(root, exclude):
        rel = folder.relative_to(root)
        for name, out in zip(files, output_names(files), strict=True):
            yield Item(source=str(folder / name), output=(rel / out).as_posix())


def output_names(names: list[str]) -> list[str]:
    """Output names for the files of one folder: `a.jpg` -> `a.png`.

    Files that share a stem (`a.jpg`, `a.webp`) all keep their full name instead
    (`a.jpg.png`, `a.webp.png`), so no output depends on which file came first; a name still
    taken after that gets `~2`, `~3`, ... in order.
    """
    stems = Counter(PurePosixPath(n).stem for n in names)
    wanted = [
        f"{PurePosixPath(n).stem}.png" if stems[PurePosixPath(n).stem] == 1 else f"{n}.png"
        for n in names
    ]
    return dedupe(wanted)


def dedupe(names: list[str]) -> list[str]:
    """Make names unique in order: a repeat of `x.png` becomes `x~2.png`, then `x~3.png`."""
    taken: set[str] = set()
    out = []
    for name in names:
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name[: -len('.png')]}~{n}.png"
        taken.add(candidate)
        out.append(candidate)
    return out


def safe_relative(text: str, what: str) -> PurePosixPath:
    """`text` as a relative path that stays inside its folder, else ValueError saying why."""
    if not text or "\x00" in text:
        raise ValueError(f"{what} is empty or contains NUL")
    path = PurePosixPath(text.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ValueError(f"{what} {text!r} would leave the output folder")
    return path


def read_manifest(path: Path) -> list[Item]:
    """Items of a .csv (header with `path`, optional `id`) or .jsonl manifest, in file order."""
    rows = list(_csv_rows(path) if path.suffix.lower() == ".csv" else _jsonl_rows(path))
    base = path.parent.absolute()
    items: list[Item] = []
    for where, value, ident, problem in rows:
        items.append(_manifest_item(base, where, value, ident, problem))
    return _name_manifest_outputs(items)


Row = tuple[str, str | None, str | None, str | None]  # where, path, id, problem


def _csv_rows(path: Path) -> Iterator[Row]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise ConfigError(f"{path}: the CSV header must have a `path` column (and maybe `id`)")
        for row in reader:
            where = f"{path.name}:{reader.line_num}"
            yield where, row.get("path") or None, row.get("id") or None, None


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                row = json.loads(line)
                value, ident = row.get("path"), row.get("id")
            except (json.JSONDecodeError, AttributeError):
                yield where, None, None, "not a JSON object with a `path`"
                continue
            if not isinstance(value, str) or not isinstance(ident, str | int | None):
                yield where, None, None, "`path` must be a string and `id` a string or number"
                continue
            yield where, value, None if ident is None else str(ident), None


def _manifest_item(
    base: Path, where: str, value: str | None, ident: str | None, problem: str | None
) -> Item:
    if problem or not value:
        return Item(source=where, output=None, id=ident, error=problem or "no `path`")
    if "\x00" in value:
        return Item(source=where, output=None, id=ident, error="path contains NUL")
    source = base / value  # an absolute `value` stays as it is
    try:
        if ident is not None:
            return Item(str(source), str(safe_relative(ident, "id")) + ".png", ident)
        rel = os.path.relpath(os.path.normpath(source), base)
        return Item(str(source), str(safe_relative(rel, "path")), None)
    except ValueError as exc:
        hint = "" if ident is not None else "; give the row an `id`"
        return Item(source=str(source), output=None, id=ident, error=f"{exc}{hint}")


def _name_manifest_outputs(items: list[Item]) -> list[Item]:
    """Turn mirrored paths into PNG names (stem rule per folder), then make all names unique."""
    by_folder: dict[PurePosixPath, list[int]] = {}
    for index, item in enumerate(items):
        if item.output and item.id is None:
            by_folder.setdefault(PurePosixPath(item.output).parent, []).append(index)
    named = [item.output for item in items]
    for folder, indexes in by_folder.items():
        names = [PurePosixPath(items[i].output or "").name for i in indexes]
        for i, name in zip(indexes, output_names(names), strict=True):
            named[i] = str(folder / name)
    valid = [i for i, n in enumerate(named) if n and items[i].error is None]
    unique = dedupe([named[i] or "" for i in valid])
    out = list(items)
    for i, name in zip(valid, unique, strict=True):
        out[i] = Item(items[i].source, name, items[i].id)
    return out
