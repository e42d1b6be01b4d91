"""A thin client of bgq's HTTP API, for services that cannot share the store.

with HttpClient("http://bgq:8000", api_key="...") as bgq:
    png = bgq.remove(Path("shoe.jpg").read_bytes(), bgcolor=(255, 255, 255, 255))
    webp = bgq.remove(image_url="https://shop.example/shoe.jpg", format="webp", crop=True)
    job = bgq.submit(data, callback_url="https://shop.example/hooks/bgq")

Options are the API's fields: model, the rembg options, format, quality, crop, crop_margin,
canvas, padding, position, roi, scale, fit_megapixels.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from bgq import defaults

Image = bytes | str | Path


class ApiError(Exception):
    """A non-2xx answer: HTTP status, bgq's error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _query(values: dict[str, Any]) -> dict[str, str]:
    """Options as the API reads them: booleans as true/false, bgcolor as r,g,b,a."""
    query = {}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            query[name] = "true" if value else "false"
        elif isinstance(value, tuple | list):
            query[name] = ",".join(str(v) for v in value)
        else:
            query[name] = str(value)
    return query


def _image_bytes(image: Image) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


class HttpClient:
    """Calls `bgq api`; every method raises ApiError on an error answer."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=base_url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, url, **kwargs)
        if response.is_success or response.status_code == 304:
            return response
        try:
            err = response.json()["error"]
            code, message = err["code"], err["message"]
        except (ValueError, KeyError, TypeError):
            code, message = "http_error", response.text[:200]
        raise ApiError(response.status_code, code, message)

    def _post_image(
        self,
        path: str,
        image: Image | None,
        fields: dict[str, Any],
        timeout: float | None = None,
    ) -> httpx.Response:
        """POST the image as the raw body, or no body when `fields` has an image_url."""
        if image is None:
            body: dict[str, Any] = {}
        else:
            body = {
                "content": _image_bytes(image),
                "headers": {"Content-Type": "application/octet-stream"},
            }
        limit = timeout if timeout is not None else self.http.timeout
        return self._call("POST", path, params=_query(fields), timeout=limit, **body)

    def remove(
        self,
        image: Image | None = None,
        model: str | None = None,
        wait: float = defaults.API_WAIT,
        timeout: float = defaults.JOB_TIMEOUT,
        **options: Any,
    ) -> bytes:
        """The result: POST /v1/remove, then, if the job outlives `wait`, poll for it.

        Give the image's bytes or path, or `image_url=` for the API to fetch it.
        """
        fields = {"model": model, "wait": wait, **options}
        # The API may first spend up to its BGQ_FETCH_TIMEOUT fetching an image_url.
        fetching = defaults.FETCH_TIMEOUT if "image_url" in options else 0.0
        response = self._post_image("/v1/remove", image, fields, timeout=wait + fetching + 30)
        if response.status_code == 200:
            return response.content
        return self.wait(response.json()["id"], timeout=timeout)

    def submit(
        self,
        image: Image | None = None,
        model: str | None = None,
        callback_url: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """POST /v1/jobs: the job JSON (`id`, `status`, `cached`, `result_url`); an image or
        `image_url=`."""
        fields = {"model": model, "callback_url": callback_url, **options}
        return dict(self._post_image("/v1/jobs", image, fields).json())

    def job(self, job_id: str) -> dict[str, Any]:
        """GET /v1/jobs/{id}: status, error, result_url, model, created_at, finished_at."""
        return dict(self._call("GET", f"/v1/jobs/{job_id}").json())

    def result(self, job_id: str) -> bytes:
        """GET /v1/jobs/{id}/result: the result (ApiError 409 while the job is not done)."""
        return self._call("GET", f"/v1/jobs/{job_id}/result").content

    def wait(self, job_id: str, timeout: float = defaults.JOB_TIMEOUT, poll: float = 0.5) -> bytes:
        """Poll a job until it is done and return its result; ApiError if it failed."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] == "done":
                return self.result(job_id)
            if job["status"] == "failed":
                raise ApiError(422, "job_failed", job["error"] or "the job failed")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} not done after {timeout:g}s")
            time.sleep(poll)

    def ready(self) -> bool:
        """True when the API reaches Redis and at least one worker is online."""
        return self.http.get("/readyz").status_code == 200
