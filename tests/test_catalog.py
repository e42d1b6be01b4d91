"""What `bgq ingest` reads: folder walks, manifests, output names and path safety (unit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bgq.errors import ConfigError
from producer.catalog import (
    Item,
    dedupe,
    open_catalog,
    output_names,
    read_manifest,
    safe_relative,
    url_stem,
)
from tests.helpers import SAMPLES

# Every naming rule holds for each output format's extension.
EXTS = pytest.mark.parametrize("ext", [".png", ".webp", ".jpg"])


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def outputs(items: list[Item]) -> dict[str, str | None]:
    return {Path(i.source).name: i.output for i in items}


@EXTS
def test_a_folder_is_walked_recursively_and_mirrored(tmp_path: Path, ext: str) -> None:
    src = tmp_path / "src"
    for rel in ["shoes/red/1.jpg", "shoes/blue/2.webp", "top.png", "noext", ".hidden.jpg"]:
        touch(src / rel)
    touch(src / ".git" / "x.jpg")
    total, items = open_catalog(src, ext=ext)
    found = {Path(i.source).relative_to(src).as_posix(): i.output for i in items}
    assert total == 4
    assert found == {
        "shoes/blue/2.webp": f"shoes/blue/2{ext}",
        "shoes/red/1.jpg": f"shoes/red/1{ext}",
        "top.png": f"top{ext}",
        "noext": f"noext{ext}",
    }


def test_the_output_folder_inside_the_source_is_not_walked(tmp_path: Path) -> None:
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "out" / "a.png")
    total, items = open_catalog(tmp_path, exclude=tmp_path / "out")
    assert total == 1 and [i.output for i in items] == ["a.png"]


@EXTS
def test_inputs_sharing_a_stem_keep_their_full_names(ext: str) -> None:
    assert output_names(["a.jpg", "a.webp", "b.jpg"], ext) == [
        f"a.jpg{ext}",
        f"a.webp{ext}",
        f"b{ext}",
    ]
    # "x<ext>" + "x.gif" -> "x<ext><ext>", which the file "x<ext><ext>" also wants: numbered.
    names = output_names(["x.gif", f"x{ext}", f"x{ext}{ext}"], ext)
    assert names == [f"x.gif{ext}", f"x{ext}{ext}", f"x{ext}~2{ext}"]
    assert len(set(names)) == 3


@EXTS
def test_dedupe_numbers_repeats_in_order(ext: str) -> None:
    assert dedupe([f"a{ext}", f"a{ext}", f"b/a{ext}", f"a{ext}"], ext) == [
        f"a{ext}",
        f"a~2{ext}",
        f"b/a{ext}",
        f"a~3{ext}",
    ]


@pytest.mark.parametrize("text", ["../x", "a/../../x", "/etc/x", "a\x00b", "", "..\\x"])
def test_paths_leaving_the_folder_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        safe_relative(text, "id")


@EXTS
def test_a_csv_manifest_with_ids_and_paths(tmp_path: Path, ext: str) -> None:
    touch(tmp_path / "imgs" / "1.jpg")
    manifest = tmp_path / "list.csv"
    manifest.write_text(
        "id,path,price\n"
        "sku-1,imgs/1.jpg,10\n"
        ",imgs/2.jpg,11\n"
        "sku-3,/abs/3.jpg,12\n"
        ",../outside.jpg,13\n"
        "../../etc/passwd,imgs/4.jpg,14\n"
        "sku-1,imgs/5.jpg,15\n"
    )
    items = read_manifest(manifest, ext)
    assert [(i.id, i.output) for i in items] == [
        ("sku-1", f"sku-1{ext}"),
        (None, f"imgs/2{ext}"),
        ("sku-3", f"sku-3{ext}"),
        (None, None),
        ("../../etc/passwd", None),
        ("sku-1", f"sku-1~2{ext}"),  # a repeated id gets a numbered name
    ]
    assert items[0].source == str(tmp_path / "imgs" / "1.jpg")  # relative to the manifest
    assert items[2].source == "/abs/3.jpg"
    assert (items[3].error or "").startswith("path '../outside.jpg' is outside the manifest's")
    assert "leave the output folder" in (items[4].error or "")


@EXTS
def test_a_row_outside_the_manifests_folder_without_an_id_says_what_to_do(
    tmp_path: Path, ext: str
) -> None:
    """Named after its path inside the manifest's folder, such a row has no name: the error
    quotes the path as written and says what to do."""
    sample = SAMPLES / "car-1.jpg"  # an absolute path outside the manifest's folder
    touch(tmp_path / "cat" / "imgs" / "1.jpg")
    manifest = tmp_path / "cat" / "list.csv"
    inside = tmp_path / "cat" / "imgs" / "1.jpg"
    manifest.write_text(f"path\n{sample}\n../elsewhere/2.jpg\n{inside}\n")
    items = read_manifest(manifest, ext)
    for item, written in zip(items[:2], [str(sample), "../elsewhere/2.jpg"], strict=True):
        assert item.output is None
        assert item.error == (
            f"path {written!r} is outside the manifest's folder ({tmp_path / 'cat'}), and a row "
            f"without an `id` is named after its path inside that folder: give the row an `id` "
            f"(the output is then ID{ext}), or put the file in the manifest's folder"
        )
    assert items[2].output == f"imgs/1{ext}"  # an absolute path inside the folder is named by it
    with_id = tmp_path / "cat" / "ids.csv"
    with_id.write_text(f"id,path\ncar,{sample}\n")
    assert [(i.source, i.output) for i in read_manifest(with_id, ext)] == [
        (str(sample), f"car{ext}")
    ]


def test_a_jsonl_manifest_reports_bad_lines_as_failed_inputs(tmp_path: Path) -> None:
    manifest = tmp_path / "list.jsonl"
    lines = [
        json.dumps({"path": "a.jpg", "id": 7}),
        "",
        "{not json",
        json.dumps({"path": "b.jpg"}),
        json.dumps({"path": "b.png"}),
        json.dumps({"id": "x"}),
        json.dumps([1, 2]),
    ]
    manifest.write_text("\n".join(lines) + "\n")
    items = read_manifest(manifest)
    assert [i.output for i in items] == ["7.png", None, "b.jpg.png", "b.png.png", None, None]
    assert items[1].source == "list.jsonl:3" and items[1].error
    assert "exactly one of `path` and `url`" in (items[4].error or "")
    assert "not a JSON object" in (items[5].error or "")


def test_bad_sources_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such"):
        open_catalog(tmp_path / "missing")
    touch(tmp_path / "list.txt")
    with pytest.raises(ConfigError, match=r"\.csv or \.jsonl"):
        open_catalog(tmp_path / "list.txt")
    (tmp_path / "nopath.csv").write_text("id,file\n1,a.jpg\n")
    with pytest.raises(ConfigError, match="`path` or `url` column"):
        open_catalog(tmp_path / "nopath.csv")


@EXTS
def test_url_rows_next_to_path_rows(tmp_path: Path, ext: str) -> None:
    touch(tmp_path / "shoe.jpg")
    manifest = tmp_path / "list.csv"
    manifest.write_text(
        "id,path,url\n"
        ",shoe.jpg,\n"
        ",,https://cdn.example/img/shoe.jpg?w=800\n"  # same stem as the path row: numbered
        "sku-9,,http://cdn.example/a/b.png\n"
        ",,https://cdn.example/\n"  # no file name in the URL
        ",shoe.jpg,https://cdn.example/x.jpg\n"  # both
        "sku-0,,\n"  # neither
        ",,ftp://cdn.example/x.jpg\n"
        "../up,,https://cdn.example/x.jpg\n"
    )
    items = read_manifest(manifest, ext)
    assert [(i.output, i.by_url) for i in items] == [
        (f"shoe{ext}", False),
        (f"shoe~2{ext}", True),
        (f"sku-9{ext}", True),
        (f"image{ext}", True),
        (None, False),
        (None, False),
        (None, True),
        (None, True),
    ]
    assert items[1].source == "https://cdn.example/img/shoe.jpg?w=800"
    assert "exactly one of `path` and `url`" in (items[4].error or "")
    assert "has both" in (items[4].error or "") and "has neither" in (items[5].error or "")
    assert "http:// or https://" in (items[6].error or "")
    assert "leave the output folder" in (items[7].error or "")


def test_a_jsonl_manifest_with_urls(tmp_path: Path) -> None:
    manifest = tmp_path / "list.jsonl"
    rows = [
        {"url": "https://cdn.example/p/red%20shoe.webp"},
        {"url": 5},
        {"id": 3, "url": "http://h/x"},
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = read_manifest(manifest, ".webp")
    assert [i.output for i in items] == ["red shoe.webp", None, "3.webp"]
    assert "must be strings" in (items[1].error or "")


@pytest.mark.parametrize(
    ("url", "stem"),
    [
        ("https://h/a/shoe.jpg", "shoe"),
        ("https://h/a/shoe.jpg?x=1#y", "shoe"),
        ("https://h/a/shoe", "shoe"),
        ("https://h/a%2Fb.png", "b"),
        ("https://h/", "image"),
        ("https://h", "image"),
        ("https://h/..", "image"),
        ("https://h/.hidden", "image"),
        ("https://h/a%00b.jpg", "image"),
    ],
)
def test_url_stems(url: str, stem: str) -> None:
    assert url_stem(url) == stem
