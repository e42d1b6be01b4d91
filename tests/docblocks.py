"""The fenced code blocks of README.md, docs/*.md and deploy/README.md, each with the fate its
marker decides.

A marker is an HTML comment on the last non-blank line before a fence (readers never see it):

    <!-- doc-test: start group=NAME -->     start group NAME's servers in the background (sh)
    <!-- doc-test: run group=NAME -->       run in the group's folder, against them (sh, python)
    <!-- doc-test: env group=NAME -->       sets BGQ_* variables: run; bgq's settings load them
    <!-- doc-test: services group=NAME -->  long-running commands, one a line (sh; `export` lines
                                            set their environment): each started, waited for
                                            until it answers, stopped with SIGTERM, exit 0
    <!-- doc-test: skip-run reason=WHY -->  not runnable here (WHY); syntax checked only

A group's blocks run in reading order (README.md, then docs/*.md by name, then
deploy/README.md), each in a new shell or Python process, in one folder and with one
environment.

Shell and Python blocks need one; blocks in other languages (text, json, yaml, http) are
checked for what their language allows and carry none. Every fence names its language. Only
three-backtick fences are read: a `~~~` fence, a longer backtick fence or an opening fence
with more than a language after it fails the extraction instead of hiding a block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNABLE = {"sh", "python"}  # what a reader can paste and run
CHECKED = {"text", "json", "yaml", "http"}  # what a reader reads
FATES = {"run", "start", "env", "services", "skip-run"}

FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\s*$")
# Any other line that opens a fence: a style this module does not read.
OTHER_FENCE = re.compile(r"^ *(~{3,}|`{3,})")
MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<fate>[\w-]+)(?P<args>.*?)-->\s*$")


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository root
    line: int  # the opening fence's, 1-based
    lang: str
    text: str  # dedented by the fence's indentation
    fate: str | None = None
    group: str | None = None
    reason: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def doc_files(root: Path = ROOT) -> list[Path]:
    return [
        root / "README.md",
        *sorted((root / "docs").glob("*.md")),
        root / "deploy" / "README.md",
    ]


def blocks(root: Path = ROOT) -> list[Block]:
    """Every fenced block of README.md, docs/*.md and deploy/README.md, in reading order."""
    found: list[Block] = []
    for path in doc_files(root):
        found.extend(_blocks_of(path.relative_to(root).as_posix(), path.read_text()))
    return found


def _blocks_of(name: str, doc: str) -> list[Block]:
    lines = doc.split("\n")
    found, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            if OTHER_FENCE.match(lines[i]):
                raise ValueError(
                    f"{name}:{i + 1}: a fence tests/docblocks.py does not read "
                    f"({lines[i].strip()!r}): use ``` and a language"
                )
            i += 1
            continue
        indent, end = len(fence["indent"]), i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise ValueError(f"{name}:{i + 1}: a fence that never closes")
        text = "\n".join(line[indent:] for line in lines[i + 1 : end]) + "\n"
        found.append(Block(name, i + 1, fence["lang"], text, **_marker_before(lines, i)))
        i = end + 1
    return found


def _marker_before(lines: list[str], fence: int) -> dict[str, str | None]:
    before = fence - 1
    while before >= 0 and not lines[before].strip():
        before -= 1
    marker = MARKER.match(lines[before]) if before >= 0 else None
    if not marker:
        return {}
    args = marker["args"]
    group = re.search(r"\bgroup=(\S+)", args)
    reason = re.search(r"\breason=(.+)", args)
    return {
        "fate": marker["fate"],
        "group": group[1] if group else None,
        "reason": reason[1].strip() if reason else None,
    }


def problems(found: list[Block]) -> list[str]:
    """What leaves a block without a decided fate (empty when every block has one)."""
    bad = []
    for block in found:
        if block.lang not in RUNNABLE | CHECKED:
            bad.append(
                f"{block.where}: fence language {block.lang!r} (name one of "
                f"{sorted(RUNNABLE | CHECKED)})"
            )
        elif block.lang in CHECKED and block.fate is not None:
            bad.append(f"{block.where}: a {block.lang} block is checked, never run: no marker")
        elif block.lang in RUNNABLE and block.fate not in FATES:
            bad.append(
                f"{block.where}: {block.lang} block with no doc-test marker (run, start, "
                "env or skip-run; see tests/docblocks.py)"
            )
        elif block.fate == "skip-run" and not block.reason:
            bad.append(f"{block.where}: skip-run without a reason=")
        elif block.fate in {"run", "start", "env", "services"} and not block.group:
            bad.append(f"{block.where}: {block.fate} without a group=")
        elif block.fate in {"start", "env", "services"} and block.lang != "sh":
            bad.append(f"{block.where}: {block.fate} is for sh blocks")
    return bad
