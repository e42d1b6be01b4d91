"""The memory limits: the defaults fit each other, and a worker refuses before decoding."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from PIL import Image

from bgq import defaults
from bgq.errors import JobFailed
from bgq.options import Options
from producer import Producer
from tests.stacks import StackFactory
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


def test_rembg_loads_without_its_matting_and_post_processing_libraries() -> None:
    """In a fresh process as in a pool process: rembg's import pulls in none of numba,
    pymatting, scipy.ndimage or skimage.morphology, and its kernel is skimage's own."""
    code = (
        "import sys\n"
        "from workers import session\n"
        "session.defer_rembg_extras()\n"
        "import rembg.bg\n"
        "real = [m for m in ('numba', 'pymatting.alpha.estimate_alpha_cf', 'scipy.ndimage',"
        " 'skimage.morphology') if m in sys.modules"
        " and type(sys.modules[m]).__name__ != '_DeferredModule']\n"
        "print(real, rembg.bg.kernel.tolist(), rembg.bg.kernel.dtype)\n"
    )
    env = {**os.environ, "BGQ_REDIS_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    from skimage.morphology import disk

    assert done.stdout.split("\n")[0] == f"[] {disk(1).tolist()} {disk(1).dtype}"


@pytest.mark.parametrize("radius", [1, 2, 3, 7])
def test_the_disk_stand_in_is_skimages_disk(radius: int) -> None:
    from skimage.morphology import disk

    from workers.session import _Disk

    ours = _Disk("skimage.morphology", "disk")(radius)
    assert ours.dtype == disk(radius).dtype and (ours == disk(radius)).all()
