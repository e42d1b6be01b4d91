"""BGQ_MAX_MEGAPIXELS guards decoding, not the cache: an input whose result is already stored is
answered from the store whatever its size (docs/settings.md), through the real API, Redis and
prefork workers with the u2netp model."""

from __future__ import annotations

import httpx

from bgq.stack import LocalStack
from tests.helpers import JPEG, api_servers, error_of, variant


def test_a_stored_result_is_served_over_the_limit_and_a_new_input_refused(
    stack: LocalStack,
) -> None:
    data = variant("car-1.jpg", (0, 0, 400, 300))  # 0.12 MP
    other = variant("car-1.jpg", (1, 0, 401, 300))  # as large, never computed
    with api_servers(stack) as start, httpx.Client(timeout=120) as http:
        roomy, tight = start(), start(max_megapixels=0.1)
        computed = http.post(roomy + "/v1/remove", content=data, headers=JPEG)
        assert computed.status_code == 200 and computed.headers["x-bgq-cached"] == "false"
        stored = http.post(tight + "/v1/remove", content=data, headers=JPEG)
        assert stored.status_code == 200 and stored.headers["x-bgq-cached"] == "true"
        assert stored.content == computed.content
        refused = http.post(tight + "/v1/remove", content=other, headers=JPEG)
        assert refused.status_code == 413 and error_of(refused)["code"] == "image_too_large"
        assert "0.1" in error_of(refused)["message"]
