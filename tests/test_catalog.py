"""What `bgq ingest` reads: folder walks, manifests, output names and path safety (unit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bgq.errors import ConfigError
from producer.catalog import Item, dedupe, open_catalog, output_names, read_manifest, safe_relative


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def outputs(items: list[Item]) -> dict[str, str | None]:
    return {Path(i.source).name: i.output for i in items}


def test_a_folder_is_walked_recursively_and_mirrored(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for rel in ["shoes/red/1.jpg", "shoes/blue/2.webp", "top.png", "noext", ".hidden.jpg"]:
        touch(src / rel)
    touch(src / ".git" / "x.jpg")
    total, items = open_catalog(src)
    found = {Path(i.source).relative_to(src).as_posix(): i.output for i in items}
    assert total == 4
    assert found == {
        "shoes/blue/2.webp": "shoes/blue/2.png",
        "shoes/red/1.jpg": "shoes/red/1.png",
        "top.png": "top.png",
        "noext": "noext.png",
    }


def test_the_output_folder_inside_the_source_is_not_walked(tmp_path: Path) -> None:
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "out" / "a.png")
    total, items = open_catalog(tmp_path, exclude=tmp_path / "out")
    assert total == 1 and [i.output for i in items] == ["a.png"]


def test_inputs_sharing_a_stem_keep_their_full_names() -> None:
    assert output_names(["a.jpg", "a.webp", "b.jpg"]) == ["a.jpg.png", "a.webp.png", "b.png"]
    # "x.png" + "x.jpg" -> "x.png.png", which the file "x.png.png" also wants: numbered.
    names = output_names(["x.jpg", "x.png", "x.png.png"])
    assert names == ["x.jpg.png", "x.png.png", "x.png~2.png"]
    assert len(set(names)) == 3


def test_dedupe_numbers_repeats_in_order() -> None:
    assert dedupe(["a.png", "a.png", "b/a.png", "a.png"]) == [
        "a.png",
        "a~2.png",
        "b/a.png",
        "a~3.png",
    ]


@pytest.mark.parametrize("text", ["../x", "a/../../x", "/etc/x", "a\x00b", "", "..\\x"])
def test_paths_leaving_the_folder_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        safe_relative(text, "id")


def test_a_csv_manifest_with_ids_and_paths(tmp_path: Path) -> None:
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
    items = read_manifest(manifest)
    assert [(i.id, i.output) for i in items] == [
        ("sku-1", "sku-1.png"),
        (None, "imgs/2.png"),
        ("sku-3", "sku-3.png"),
        (None, None),
        ("../../etc/passwd", None),
        ("sku-1", "sku-1~2.png"),  # a repeated id gets a numbered name
    ]
    assert items[0].source == str(tmp_path / "imgs" / "1.jpg")  # relative to the manifest
    assert items[2].source == "/abs/3.jpg"
    assert "leave the output folder" in (items[3].error or "") and "id" in (items[3].error or "")
    assert "leave the output folder" in (items[4].error or "")


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
    assert "`path` must be a string" in (items[4].error or "")


def test_bad_sources_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such"):
        open_catalog(tmp_path / "missing")
    touch(tmp_path / "list.txt")
    with pytest.raises(ConfigError, match=r"\.csv or \.jsonl"):
        open_catalog(tmp_path / "list.txt")
    (tmp_path / "nopath.csv").write_text("id,file\n1,a.jpg\n")
    with pytest.raises(ConfigError, match="`path` column"):
        open_catalog(tmp_path / "nopath.csv")
