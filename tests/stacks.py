"""What test modules and conftest.py share about stacks and stores: two-store runs, S3 settings."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.s3server import S3Server
from bgq.stack import LocalStack

STORES = ("file", "s3")
# Runs a test (and its module's stack) once on each store backend. The "file" run's param is
# None, the value a test that is not parametrised has: pytest keeps a module-scoped fixture
# while its param stays the same, so the plain tests and the "file" ones share one stack.
both_stores = pytest.mark.parametrize(
    "store_kind", [None, "s3"], ids=STORES, indirect=True, scope="module"
)

WEBHOOK_SECRET = "webhook-test-secret"  # signs the webhooks of the API tests' stack
StackFactory = Callable[..., LocalStack]  # conftest's make_stack: settings overrides -> a stack


def s3_settings(server: S3Server) -> dict[str, object]:
    """Settings overrides for a store in a new bucket of `server`, under a prefix."""
    return {"store_url": f"s3://{server.bucket()}/bgq", "s3_endpoint_url": server.url}
