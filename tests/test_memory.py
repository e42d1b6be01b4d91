"""The memory limits: the defaults fit each other, and a worker refuses before decoding."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from bgq import defaults
from bgq.contract import Options
from bgq.errors import JobFailed
from producer import Producer
from tests.conftest import StackFactory
from workers.imaging import estimated_peak_mib


@pytest.mark.parametrize(
    "options",
    [{}, {"only_mask": True}, {"post_process_mask": True}, {"bgcolor": (0, 0, 0, 255)}],
    ids=str,
)
def test_default_megapixel_limit_fits_the_default_memory_limit(options: dict[str, object]) -> None:
    peak = estimated_peak_mib(defaults.MAX_MEGAPIXELS, Options.parse(options))
    assert peak <= defaults.MAX_MEMORY_PER_CHILD_MB


def test_alpha_matting_at_the_megapixel_limit_would_not_fit() -> None:
    """So the worker refuses it (below) instead of growing a process to many GiB."""
    peak = estimated_peak_mib(defaults.MAX_MEGAPIXELS, Options(alpha_matting=True))
    assert peak > defaults.MAX_MEMORY_PER_CHILD_MB


def truncated_png(width: int, height: int) -> bytes:
    """A PNG whose header is whole but whose pixels stop half-way: decoding it fails."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, "PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]


def test_worker_refuses_an_input_over_the_memory_limit_before_decoding(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(concurrency=1)
    producer = Producer(stack.settings)
    data = truncated_png(3000, 2000)  # 6 MP: fits as a cutout, not with alpha matting
    with pytest.raises(JobFailed, match="BGQ_MAX_MEMORY_PER_CHILD_MB") as refused:
        producer.submit(data, alpha_matting=True).wait(timeout=120)
    assert refused.value.permanent
    assert "alpha matting" in refused.value.error
    # The same bytes as a plain cutout pass the check, so the worker decodes them and fails
    # there: the refusal above came before any pixel was decoded.
    with pytest.raises(JobFailed, match="truncated") as decoded:
        producer.submit(data).wait(timeout=120)
    assert decoded.value.permanent
