"""Per-key API limits as BGQ_API_LIMITS writes them, and the short ids that name the keys.

A key is never written twice: BGQ_API_LIMITS, logs and metrics name it by its id, the first
12 hex digits of its SHA-256 (`bgq api --key-ids` prints them), or `*` for every key. Parsing
does no I/O, so settings can check the value when they are read.

    BGQ_API_LIMITS='*: interactive.rpm=600 interactive.jobs=20 bulk.jobs=2000;
                    3f9a2c1b7d4e: bulk.jobs=50000 bulk.rpm=none'
"""

from __future__ import annotations

import hashlib
import re

LANES = ("interactive", "bulk")  # bgq.contract.LANES (the bottom imports nothing above it)
KINDS = {"rpm": "requests per minute", "jobs": "jobs outstanding at once"}
EVERY_KEY = "*"
KEY_ID_RE = re.compile(r"[0-9a-f]{12}")
RULE_RE = re.compile(r"([a-z]+)\.([a-z]+)=([0-9]+|none)")
SHOWN_RE = re.compile(r"[a-z]+\.[a-z]+=[-a-z0-9]*")  # shaped like a rule: errors may show it
FORMAT = "`<key id or *>: <lane>.<rpm|jobs>=<n|none> ...` entries separated by `;`"

Rule = tuple[str, str]  # (lane, kind)
Table = dict[str, dict[Rule, int | None]]  # "*" or a key id -> rule -> limit (None: none)


def key_id(key: str) -> str:
    """A key's stable short id: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def parse_limits(text: str) -> Table:
    """The limits of BGQ_API_LIMITS; ValueError names what is wrong, and never echoes what
    stands where a key id belongs (a key written there by mistake): entries by number then."""
    table: Table = {}
    for number, entry in enumerate(filter(None, (part.strip() for part in text.split(";"))), 1):
        who, colon, rules = (part.strip() for part in entry.partition(":"))
        if not colon:
            raise ValueError(f"entry {number} has no `:`; each entry is {FORMAT}")
        if not is_who(who):
            raise ValueError(
                f"entry {number} names something that is not a key id (12 hex digits, "
                f"`bgq api --key-ids` prints them) or `{EVERY_KEY}`; each entry is {FORMAT}"
            )
        if who in table:
            raise ValueError(f"{who!r} has two entries")
        table[who] = parse_rules(who, rules)
    return table


def is_who(who: str) -> bool:
    """Whether an entry's first part is a key id or `*` (only then may a message show it)."""
    return who == EVERY_KEY or KEY_ID_RE.fullmatch(who) is not None


def parse_rules(who: str, text: str) -> dict[Rule, int | None]:
    """One entry's rules: `lane.kind=n` (a positive integer) or `=none`, by spaces or commas.
    A word not even shaped like a rule is named by its place, not shown: it may be a key."""
    rules: dict[Rule, int | None] = {}
    name = who if is_who(who) else "an entry"
    for number, word in enumerate(text.replace(",", " ").split(), 1):
        match = RULE_RE.fullmatch(word)
        if not match or match[1] not in LANES or match[2] not in KINDS:
            shown = repr(word) if SHOWN_RE.fullmatch(word) else f"rule {number}"
            raise ValueError(
                f"{name}: {shown} is not <lane>.<kind>=<n|none> "
                f"(lanes: {', '.join(LANES)}; kinds: {', '.join(KINDS)})"
            )
        limit = None if match[3] == "none" else int(match[3])
        if limit == 0:
            raise ValueError(f"{name}: {word!r}: a limit is at least 1 (none: no limit)")
        rules[(match[1], match[2])] = limit
    if not rules:
        raise ValueError(f"{name}: no limits (write them as {FORMAT})")
    return rules


def limits_for(table: Table, key: str) -> dict[Rule, int]:
    """The limits of the key with this id: its own entry over the `*` entry's."""
    merged = {**table.get(EVERY_KEY, {}), **table.get(key, {})}
    return {rule: limit for rule, limit in merged.items() if limit is not None}
