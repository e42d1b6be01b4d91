"""Every relative link in the Markdown docs leads somewhere: the file exists and its `#anchor` is
a heading there (GitHub's slugs) or an explicit `<a id>`; and every error code the API can
answer is in docs/service.md's error table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from producer.api import errors

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "deploy" / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
EXPLICIT = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def prose(path: Path) -> str:
    """The file's text without fenced code blocks (their `#` lines are not headings)."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links and code unwrapped), lower case, with
    punctuation other than `-` and `_` dropped and each space a `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set(EXPLICIT.findall(path.read_text(encoding="utf-8")))
    for heading in HEADING.findall(prose(path)):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    text = CODE_SPAN.sub("", prose(path))
    return LINK.findall(text) + REFERENCE.findall(text)


def test_the_slugs_are_githubs() -> None:
    assert slug("HTTP API: `bgq api [--host 127.0.0.1]`") == "http-api-bgq-api---host-127001"
    assert slug("Workers' roles (`BGQ_ROLES`)") == "workers-roles-bgq_roles"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(doc: Path) -> None:
    broken = []
    for target in links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check
            continue
        file, _, anchor = target.partition("#")
        where = (doc.parent / file).resolve() if file else doc
        if not where.exists():
            broken.append(f"{target}: no {where.relative_to(ROOT)}")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(f"{target}: no heading #{anchor} in {where.relative_to(ROOT)}")
    assert not broken, broken


def api_error_codes() -> set[str]:
    """Every code the API's source can answer: ApiError and error_response calls, and the
    framework's HTTP errors as errors.py names them."""
    call = re.compile(r"\b(?:ApiError|error_response)\(\s*[^,()]+,\s*\"([a-z_]+)\"")
    codes = {errors.OTHER_HTTP_CODE, *errors.HTTP_CODES.values()}
    for module in (ROOT / "producer" / "api").glob("*.py"):
        codes.update(call.findall(module.read_text(encoding="utf-8")))
    return codes


def test_every_api_error_code_is_in_the_error_table() -> None:
    service = (ROOT / "docs" / "service.md").read_text(encoding="utf-8")
    table_text = service.split("| status | code | when |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\s*\|[^|]+\|([^|]+)\|", table_text, re.M)
    table = {code for row in rows for code in re.findall(r"`([a-z_]+)`", row)}
    codes = api_error_codes()
    assert {"unauthorized", "rate_limited", "method_not_allowed", "internal"} <= codes
    assert codes - table == set(), sorted(codes - table)
