"""The HTTP API (`bgq api`): FastAPI on the same Producer as Python callers.

`app` wires the pieces: `deps` (what routes read from `app.state`, the API-key check), the
routers `jobs` (/v1) and `ops` (/healthz, /readyz, /metrics), `page` (the web page at `/`, with
`page.html` and `static/`), `submission` (reading a submission: a file, a body or an
`image_url`), `openapi` (the OpenAPI document), `errors` (the JSON error shape), `limits` (the
body limit) and `metrics` (Prometheus).
"""

from producer.api.app import create_app

__all__ = ["create_app"]
