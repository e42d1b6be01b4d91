"""The memory limits: the defaults fit each other, and a worker refuses before decoding."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from bgq import defaults
from bgq.errors import ImageTooLarge, JobFailed
from bgq.options import Options
from bgq.settings import Settings
from producer import Producer
from tests.stacks import StackFactory
from workers import imaging, models, session
from workers.imaging import check_memory, estimated_peak_mib, pool_base_mib

MODEL_SETS = [("u2netp",), ("u2net",), ("u2netp", "u2net")]


@pytest.mark.parametrize("models", MODEL_SETS, ids="+".join)
@pytest.mark.parametrize(
    "options",
    [{}, {"only_mask": True}, {"post_process_mask": True}, {"bgcolor": (0, 0, 0, 255)}],
    ids=str,
)
def test_default_megapixel_limit_fits_the_default_memory_limit(
    options: dict[str, object], models: tuple[str, ...]
) -> None:
    """Also for u2net, and for a pool process that holds both u2netp and u2net."""
    peak = estimated_peak_mib(defaults.MAX_MEGAPIXELS, Options.parse(options), models=models)
    assert peak <= defaults.MAX_MEMORY_PER_CHILD_MB


def test_u2netp_alone_keeps_the_measured_base() -> None:
    """Splitting the base into runtime + session leaves u2netp's estimates where they were."""
    assert pool_base_mib() == pool_base_mib(["u2netp"]) == defaults.POOL_BASE_MIB == 350
    assert estimated_peak_mib(2.0, Options()) == 350 + 2.0 * defaults.CUTOUT_MIB_PER_MP


@pytest.mark.parametrize(
    "options",
    [Options(), Options(post_process_mask=True), Options(format="webp", canvas="6000x6000")],
    ids=["cutout", "post-process", "webp-canvas"],
)
def test_a_process_holding_two_models_is_sized_as_the_sum(options: Options) -> None:
    """Both phases (rembg's, and shaping's after it) carry every session the process holds."""
    one = estimated_peak_mib(12.0, options, models=["u2netp"])
    both = estimated_peak_mib(12.0, options, models=["u2netp", "u2net"])
    assert both - one == defaults.MODEL_SESSION_MIB["u2net"]
    alone = estimated_peak_mib(12.0, options, models=["u2net"])
    assert alone - one == defaults.MODEL_SESSION_MIB["u2net"] - defaults.MODEL_SESSION_MIB["u2netp"]
    assert estimated_peak_mib(12.0, options, models=["u2net", "u2net", "u2netp"]) == both


def test_a_model_not_measured_counts_as_u2net() -> None:
    assert pool_base_mib(["isnet-general-use"]) == pool_base_mib(["u2net"])
    assert pool_base_mib(["u2net"]) > pool_base_mib(["u2netp"])


# Weights files' sizes in bytes: rembg's u2netp and u2net, and about what birefnet-general's
# and silueta's are.
WEIGHTS_BYTES = {
    "u2netp": 4_574_861,
    "u2net": 175_997_641,
    "birefnet-general": 973_000_000,
    "silueta": 44_000_000,
}


@pytest.fixture
def weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[str], None]:
    """Note a model's weights file of its size (sparse: no disk used) in a fresh record."""
    monkeypatch.setattr(imaging, "_weights_mib", {})

    def note(model: str) -> None:
        path = tmp_path / f"{model}.onnx"
        with open(path, "wb") as fh:
            fh.truncate(WEIGHTS_BYTES[model])
        imaging.note_weights(model, path)

    return note


@pytest.mark.parametrize(("model", "mib"), [("u2netp", 200), ("u2net", 440), ("silueta", 440)])
def test_small_weights_keep_the_measured_estimates(
    weights: Callable[[str], None], model: str, mib: int
) -> None:
    """u2netp and u2net are measured; silueta is smaller than u2net: its 440."""
    weights(model)
    assert imaging.session_mib(model) == mib


def test_an_unmeasured_model_is_sized_by_its_weights(weights: Callable[[str], None]) -> None:
    """birefnet-general (973 MB of weights) is not u2net's 440 MiB: a 1080p cutout is refused
    at the default limit (its process would be OOM-killed instead), accepted at 4 GiB."""
    model = ["birefnet-general"]
    assert pool_base_mib(model) == pool_base_mib(["u2net"])  # its size not known yet
    weights("birefnet-general")
    expected = WEIGHTS_BYTES["birefnet-general"] / 2**20 * defaults.SESSION_MIB_PER_WEIGHTS_MIB
    assert imaging.session_mib("birefnet-general") == pytest.approx(expected)
    assert 2400 < expected < 2450
    img = Image.new("RGB", (1920, 1080))  # check_memory reads the size only
    with pytest.raises(ImageTooLarge, match="holding birefnet-general"):
        check_memory(img, Options(), defaults.MAX_MEMORY_PER_CHILD_MB, models=model)
    check_memory(img, Options(), 4096, models=model)
    check_memory(img, Options(), defaults.MAX_MEMORY_PER_CHILD_MB, models=["u2net"])


def test_a_worker_notes_the_weights_it_checked(
    monkeypatch: pytest.MonkeyPatch, model_home: Path
) -> None:
    """ensure_weights (the worker's main process, before fork) records each file's size."""
    monkeypatch.setattr(imaging, "_weights_mib", {})
    session.ensure_weights(Settings(model_home=model_home), ["u2netp"])
    path = models.weights_path("u2netp", model_home)
    assert imaging._weights_mib == {"u2netp": path.stat().st_size / 2**20}


def test_the_refusal_counts_the_sessions_the_process_holds() -> None:
    """A limit that a u2netp process meets for a 20 MP cutout refuses it once u2net is loaded."""
    img = Image.new("RGB", (5000, 4000))  # check_memory reads the size only
    limit = estimated_peak_mib(20.0, Options()) + 1
    check_memory(img, Options(), limit, models=["u2netp"])
    with pytest.raises(ImageTooLarge, match="holding u2net, u2netp"):
        check_memory(img, Options(), limit, models=["u2netp", "u2net"])


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
