"""What `bgq ingest` reads: a folder walked recursively, or a CSV/JSONL manifest, as Items.

Every Item says which file (or URL) to read and where its output goes under the output folder,
named with the run's format's extension (`.png`, `.webp`, `.jpg`). Output names never leave
that folder: ids and paths with `..`, absolute paths or NUL are refused.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from bgq.errors import ConfigError, PermanentError

MANIFEST_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class Item:
    """One input: the file (or URL) to read, its output path relative to DIR, and why it cannot
    run."""

    source: str
    output: str | None
    id: str | None = None
    error: str | None = None
    by_url: bool = False  # source is an http(s) URL to fetch


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


def is_url(text: str) -> bool:
    """True for an http:// or https:// URL (an input to fetch)."""
    return text[:8].lower().startswith(("http://", "https://"))


def url_stem(url: str) -> str:
    """The stem of a URL path's last name (`.../shoe.jpg?w=1` -> `shoe`), else `image`."""
    stem = PurePosixPath(unquote(urlsplit(url).path)).stem
    if not stem or stem.startswith(".") or "\x00" in stem or "\\" in stem:
        return "image"
    return stem


def open_catalog(
    src: Path, exclude: Path | None = None, ext: str = ".png"
) -> tuple[int, Iterator[Item]]:
    """The number of inputs and a stream of them; a bad SRC raises ConfigError (usage error)."""
    if src.is_dir():
        return _count_files(src, exclude), walk_folder(src, exclude, ext)
    if not src.is_file():
        raise ConfigError(f"no such folder or manifest: {src}")
    if src.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ConfigError(f"{src}: a manifest must be a .csv or .jsonl file (or give a folder)")
    items = read_manifest(src, ext)
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


def walk_folder(root: Path, exclude: Path | None = None, ext: str = ".png") -> Iterator[Item]:
    """Every visible file under `root` (images are told by content later, not by extension)."""
    for folder, files in _walk(root, exclude):
        rel = folder.relative_to(root)
        for name, out in zip(files, output_names(files, ext), strict=True):
            yield Item(source=str(folder / name), output=(rel / out).as_posix())


def output_names(names: list[str], ext: str = ".png") -> list[str]:
    """Output names for the files of one folder: `a.jpg` -> `a.png` (or `a.webp`, `a.jpg`).

    Files that share a stem (`a.jpg`, `a.webp`) all keep their full name instead
    (`a.jpg.png`, `a.webp.png`), so no output depends on which file came first; a name still
    taken after that gets `~2`, `~3`, ... in order.
    """
    stems = Counter(PurePosixPath(n).stem for n in names)
    wanted = [
        f"{PurePosixPath(n).stem}{ext}" if stems[PurePosixPath(n).stem] == 1 else f"{n}{ext}"
        for n in names
    ]
    return dedupe(wanted, ext)


def dedupe(names: list[str], ext: str = ".png") -> list[str]:
    """Make names unique in order: a repeat of `x.png` becomes `x~2.png`, then `x~3.png`.

    Every name ends with `ext`, the run's output extension.
    """
    taken: set[str] = set()
    out = []
    for name in names:
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name[: -len(ext)]}~{n}{ext}"
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


def read_manifest(path: Path, ext: str = ".png") -> list[Item]:
    """Items of a .csv (header with `path` and/or `url`, optional `id`) or .jsonl manifest, in
    file order; each row has exactly one of `path` and `url`."""
    rows = list(_csv_rows(path) if path.suffix.lower() == ".csv" else _jsonl_rows(path))
    base = path.parent.absolute()
    items = [_manifest_item(base, row, ext) for row in rows]
    return _name_manifest_outputs(items, ext)


@dataclass(frozen=True)
class Row:
    """One manifest row as read: where it is, its fields, or why it could not be read."""

    where: str
    path: str | None = None
    url: str | None = None
    id: str | None = None
    problem: str | None = None


def _csv_rows(path: Path) -> Iterator[Row]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        names = reader.fieldnames or []
        if "path" not in names and "url" not in names:
            raise ConfigError(
                f"{path}: the CSV header must have a `path` or `url` column (and maybe `id`)"
            )
        for row in reader:
            where = f"{path.name}:{reader.line_num}"
            yield Row(where, row.get("path") or None, row.get("url") or None, row.get("id") or None)


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                row = json.loads(line)
                value, url, ident = row.get("path"), row.get("url"), row.get("id")
            except (json.JSONDecodeError, AttributeError):
                yield Row(where, problem="not a JSON object with a `path` or `url`")
                continue
            if not isinstance(value, str | None) or not isinstance(url, str | None):
                yield Row(where, problem="`path` and `url` must be strings")
            elif not isinstance(ident, str | int | None):
                yield Row(where, problem="`id` must be a string or number")
            else:
                yield Row(where, value or None, url or None, None if ident is None else str(ident))


def _manifest_item(base: Path, row: Row, ext: str) -> Item:
    ident = row.id
    if row.problem or bool(row.path) == bool(row.url):
        both = "has both" if row.path else "has neither"
        problem = row.problem or f"a row needs exactly one of `path` and `url`; this one {both}"
        return Item(source=row.where, output=None, id=ident, error=problem)
    if row.url is not None:
        return _url_item(row.url, ident, ext)
    assert row.path is not None
    if "\x00" in row.path:
        return Item(source=row.where, output=None, id=ident, error="path contains NUL")
    source = base / row.path  # an absolute path stays as it is
    if ident is not None:
        try:
            return Item(str(source), str(safe_relative(ident, "id")) + ext, ident)
        except ValueError as exc:
            return Item(source=str(source), output=None, id=ident, error=str(exc))
    rel = os.path.relpath(os.path.normpath(source), base)
    try:
        return Item(str(source), str(safe_relative(rel, "path")), None)
    except ValueError:  # named after its place under the manifest's folder, it has none
        return Item(str(source), None, None, _outside(row.path, base, ext))


def _outside(written: str, base: Path, ext: str) -> str:
    """Why a row without an id whose file is not under the manifest's folder fails (its output
    is named after its path inside that folder), and what to do."""
    return (
        f"path {written!r} is outside the manifest's folder ({base}), and a row without an `id` "
        f"is named after its path inside that folder: give the row an `id` (the output is then "
        f"ID{ext}), or put the file in the manifest's folder"
    )


def _url_item(url: str, ident: str | None, ext: str) -> Item:
    """A row to fetch: named by its id, else by its URL path's stem."""
    if not is_url(url):
        return Item(url, None, ident, "`url` must start with http:// or https://", by_url=True)
    if ident is None:
        return Item(url, url_stem(url) + ext, None, by_url=True)
    try:
        return Item(url, str(safe_relative(ident, "id")) + ext, ident, by_url=True)
    except ValueError as exc:
        return Item(url, None, ident, str(exc), by_url=True)


def _name_manifest_outputs(items: list[Item], ext: str) -> list[Item]:
    """Turn mirrored paths into output names (stem rule per folder), then make all names unique."""
    by_folder: dict[PurePosixPath, list[int]] = {}
    for index, item in enumerate(items):
        if item.output and item.id is None and not item.by_url:
            by_folder.setdefault(PurePosixPath(item.output).parent, []).append(index)
    named = [item.output for item in items]
    for folder, indexes in by_folder.items():
        names = [PurePosixPath(items[i].output or "").name for i in indexes]
        for i, name in zip(indexes, output_names(names, ext), strict=True):
            named[i] = str(folder / name)
    valid = [i for i, n in enumerate(named) if n and items[i].error is None]
    unique = dedupe([named[i] or "" for i in valid], ext)
    out = list(items)
    for i, name in zip(valid, unique, strict=True):
        out[i] = dataclasses.replace(items[i], output=name)
    return out
