"""The HTTP contract: schemathesis fuzzes the live API against its own /openapi.json."""

from __future__ import annotations

import ast
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
import schemathesis
from schemathesis.engine import Status, events, from_schema
from schemathesis.engine.recorder import CheckNode

from bgq import defaults
from bgq.options import ROI_ORDER
from producer.api.removebg_fields import ONE_BACKGROUND, ONE_SOURCE, SCALED_ORIGINAL
from producer.api.submission import ONE_IMAGE
from tests.helpers import ApiServer, StandInWorker
from tests.stacks import StackFactory

# No schema can say "a decodable image within BGQ_MAX_MEGAPIXELS that rembg can process with
# these options", nor "a host that resolves to public addresses", nor "a URL that serves an
# image", so a schema-valid request may be refused for its image, its callback's address or its
# image_url, and only for them: `refused_only_for` (below) checks the error code of every such
# refusal.
UNDESCRIBABLE = {
    "image_too_large",
    "unsupported_media_type",
    "unsupported_image",
    "job_failed",
    "callback_not_allowed",
    "fetch_failed",
}
# Nor can OpenAPI state rules across parameters, or across the query and the body: exactly one
# image (a file, the body or image_url); crop_margin only with crop; padding only with a canvas,
# under half of it; position only with a canvas or scale, scale only without a canvas ("applies
# only without"); format zip without bgcolor or only_mask; nor compare numbers within one: a
# roi's x2 past x1 and y2 past y1 when both are in one unit. Such a refusal is `invalid_request`
# saying which rule.
ACROSS_FIELDS = (
    ONE_IMAGE,
    "applies only with",
    "under half the canvas",
    "zip holds the subject's colours and alpha, not with",
    ROI_ORDER,
)
# The remove.bg routes answer such refusals 400 in remove.bg's shape, with their own codes.
REMOVEBG_UNDESCRIBABLE = {
    "file_too_large",
    "resolution_too_high",
    "failed_to_read_image",  # an image (or background) not read, or image_file_b64 not base64
    "invalid_image",  # a job that failed on the image
    "failed_image_download",
    "failed_bg_download",
    "invalid_image_url",  # a URL the pattern admits and the fetcher refuses (a port past 65535)
}
# Its own rules (one image source, one background, no position=original with a scale), and
# bg_image's, which only it takes as a field: on a cutout (not with channels=alpha).
REMOVEBG_ACROSS_FIELDS = (
    *ACROSS_FIELDS,
    ONE_SOURCE,
    ONE_BACKGROUND,
    SCALED_ORIGINAL,
    "sets the background, so not with",
    "applies to a cutout, not with",
)
# Nor whether the key is over its limits (BGQ_API_LIMITS) at the time: 429, documented.
POSITIVE_STATUSES = ["2xx", "3xx", "400", "401", "404", "409", "413", "415", "422", "429"]
KEY = "contract-test-key"
# Submissions carry RateLimit fields in both lanes; bulk ones soon meet their 429.
LIMITS = "*: interactive.rpm=100000 bulk.rpm=1 bulk.jobs=1"

# What `schemathesis run` does: every check, every phase (examples, coverage, fuzzing,
# stateful), positive and negative data; bounded and derandomised so a run is short and
# repeatable.
CONFIG = {
    "generation": {"max-examples": 20, "deterministic": True, "database": "none"},
    "checks": {"positive_data_acceptance": {"expected-statuses": POSITIVE_STATUSES}},
    "request-timeout": 60,
    "workers": 4,
    "auth": {"openapi": {"bearer": {"bearer": KEY}, "removebgKey": {"api_key": KEY}}},
}
PHASES = ("EXAMPLES", "COVERAGE", "FUZZING", "STATEFUL_TESTING")


@schemathesis.check
def refused_only_for(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    """A schema-valid request is refused only for what no schema can describe."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return
    if response.status_code in (413, 415, 422):
        error = response.json()["error"]
        across = error["code"] == "invalid_request" and any(
            rule in error["message"] for rule in ACROSS_FIELDS
        )
        assert error["code"] in UNDESCRIBABLE or across, (
            f"schema-valid request refused: {response.text}"
        )
    if response.status_code == 400:  # only the remove.bg routes answer 400
        error = response.json()["errors"][0]
        across = any(rule in error["title"] for rule in REMOVEBG_ACROSS_FIELDS)
        assert error["code"] in REMOVEBG_UNDESCRIBABLE or across, (
            f"schema-valid request refused: {response.text}"
        )


@pytest.fixture(scope="module")
def api(make_stack: StackFactory) -> Iterator[str]:
    """The API on prefork workers that may sign webhooks, with a key and its limits; its base
    URL. Every model is served (a stand-in entry beside the u2netp worker): whether a worker
    serves a model at the time is no part of a request's schema (its 503 is documented, and
    tested in tests/test_served.py)."""
    stack = make_stack(webhook_secret="contract-test-secret")
    # A short fetch timeout: generated image_urls may name hosts that never answer.
    update = {"max_upload_mb": 1, "fetch_timeout": 2.0, "api_keys": KEY, "api_limits": LIMITS}
    settings = stack.settings.model_copy(update={"redis_url": stack.url, **update})
    with StandInWorker(stack.url, tuple(sorted(defaults.MODELS))):
        server = ApiServer(settings).start()
        yield server.url
        server.stop()


@pytest.fixture
def one_parse_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPython 3.11's ast.parse is not thread-safe (python/cpython#106905: a recursion counter
    shared by threads, "AST constructor recursion depth mismatch"), and hypothesis parses
    source in each of schemathesis's worker threads; they take turns."""
    lock, parse = threading.Lock(), ast.parse

    def locked(*args: Any, **kwargs: Any) -> ast.AST:
        with lock:
            return parse(*args, **kwargs)

    monkeypatch.setattr(ast, "parse", locked)


def run_schemathesis(url: str) -> tuple[list[str], Counter[str], Counter[str]]:
    """Every failure of a run against `url`'s own schema, the requests sent by phase, and the
    statuses of the answers to submissions."""
    config = schemathesis.Config.from_dict(CONFIG)
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)
    problems: list[str] = []
    requests: Counter[str] = Counter()
    submissions: Counter[str] = Counter()
    for event in from_schema(schema).execute():
        if isinstance(event, events.NonFatalError):
            problems.append(f"schemathesis could not test {event.label}: {event.info.message}")
        if isinstance(event, events.FatalError):
            problems.append(f"schemathesis failed: {event.exception!r}")
        if isinstance(event, events.ScenarioFinished):
            requests[event.phase.name] += len(event.recorder.interactions)
            problems.extend(failures_of(event.recorder.checks.values()))
            for interaction in event.recorder.interactions.values():
                if interaction.request.method == "POST" and interaction.response is not None:
                    submissions[str(interaction.response.status_code)] += 1
    return problems, requests, submissions


def failures_of(checks: Iterable[list[CheckNode]]) -> Iterator[str]:
    """Each failed check: its name, what failed, and the request as a curl command."""
    for node in (node for nodes in checks for node in nodes):
        info = node.failure_info
        if node.status != Status.SUCCESS and info is not None:
            yield f"{node.name}: {info.failure.title}\n{info.failure.message}\n{info.code_sample}"


@pytest.mark.usefixtures("one_parse_at_a_time")
def test_the_live_api_keeps_its_contract(api: str) -> None:
    problems, requests, submissions = run_schemathesis(api)
    assert not problems, "\n\n".join(problems)
    # Every phase sent requests; stateful ones follow the links from POST /v1/jobs and
    # POST /v1/remove to GET /v1/jobs/{job_id} and its /result.
    assert all(requests[phase] > 0 for phase in PHASES), requests
    # Submissions were accepted, and bulk ones (the `lane` field) were refused by their limit:
    # the 429 and its fields kept the contract too.
    assert submissions["202"] > 0 and submissions["429"] > 0, submissions
