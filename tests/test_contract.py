"""The producer/worker contract: cache keys, option parsing, store layout, task arguments."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bgq import contract, defaults
from bgq.contract import Counter, TaskArgs, cache_key, input_digest
from bgq.errors import InvalidRequest
from bgq.options import Options

REPO = Path(__file__).resolve().parent.parent
DIGEST = input_digest(b"some image bytes")
OTHER_DIGEST = input_digest(b"other image bytes")


def key_of(options: dict[str, Any], model: str = "u2netp", digest: str = DIGEST) -> str:
    return cache_key(digest, model, Options.parse(options))


# --- cache key -------------------------------------------------------------------------------


def test_cache_key_is_a_deterministic_sha256_hex() -> None:
    first = key_of({"bgcolor": (1, 2, 3, 4), "post_process_mask": True})
    second = key_of({"post_process_mask": True, "bgcolor": "1,2,3,4"})
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert first == second


def test_input_digest_is_sha256_of_the_bytes() -> None:
    assert input_digest(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_cache_key_changes_with_input_digest() -> None:
    assert key_of({}, digest=DIGEST) != key_of({}, digest=OTHER_DIGEST)


def test_cache_key_changes_with_model() -> None:
    keys = {key_of({}, model=model) for model in defaults.MODELS}
    assert len(keys) == len(defaults.MODELS)


def test_each_model_has_its_own_stored_mask() -> None:
    """u2net's masks are not u2netp's: one input's stored masks are named by model."""
    names = {contract.mask_name(DIGEST, model) for model in defaults.MODELS}
    assert len(names) == len(defaults.MODELS)


@pytest.mark.parametrize(
    ("base", "changed"),
    [
        ({}, {"alpha_matting": True}),
        ({}, {"only_mask": True}),
        ({}, {"post_process_mask": True}),
        ({"only_mask": True}, {"only_mask": True, "post_process_mask": True}),
        ({}, {"bgcolor": (0, 0, 0, 255)}),
        ({"bgcolor": (0, 0, 0, 255)}, {"bgcolor": (0, 0, 0, 254)}),
        (
            {"alpha_matting": True},
            {"alpha_matting": True, "alpha_matting_foreground_threshold": 200},
        ),
        (
            {"alpha_matting": True},
            {"alpha_matting": True, "alpha_matting_background_threshold": 20},
        ),
        ({"alpha_matting": True}, {"alpha_matting": True, "alpha_matting_erode_size": 5}),
    ],
)
def test_cache_key_changes_with_each_output_relevant_option(
    base: dict[str, Any], changed: dict[str, Any]
) -> None:
    assert key_of(base) != key_of(changed)


def test_cache_key_changes_with_pipeline_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = key_of({})
    monkeypatch.setattr(contract, "PIPELINE_VERSION", contract.PIPELINE_VERSION + ".next")
    assert key_of({}) != before


@pytest.mark.parametrize(
    ("one", "other"),
    [
        # rembg ignores the thresholds unless alpha_matting is on.
        ({}, {"alpha_matting_foreground_threshold": 1, "alpha_matting_background_threshold": 2}),
        ({}, {"alpha_matting_erode_size": 999}),
        # rembg ignores alpha_matting and bgcolor when only_mask is on.
        ({"only_mask": True}, {"only_mask": True, "alpha_matting": True}),
        ({"only_mask": True}, {"only_mask": True, "bgcolor": (9, 9, 9, 9)}),
        (
            {"only_mask": True, "post_process_mask": True},
            {
                "only_mask": True,
                "post_process_mask": True,
                "alpha_matting": True,
                "alpha_matting_erode_size": 3,
            },
        ),
        # No options at all equals rembg's defaults spelled out.
        (
            {},
            {
                "alpha_matting": False,
                "alpha_matting_foreground_threshold": 240,
                "alpha_matting_background_threshold": 10,
                "alpha_matting_erode_size": 10,
                "only_mask": False,
                "post_process_mask": False,
                "bgcolor": None,
            },
        ),
    ],
)
def test_equivalent_requests_share_a_key(one: dict[str, Any], other: dict[str, Any]) -> None:
    assert key_of(one) == key_of(other)


def test_parse_of_none_and_empty_dict_are_the_defaults() -> None:
    assert Options.parse(None) == Options.parse({}) == Options()


# --- option parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"colour": "red"}, "colour"),
        ({"alpha_matting_foreground_threshold": 256}, "alpha_matting_foreground_threshold"),
        ({"alpha_matting_background_threshold": -1}, "alpha_matting_background_threshold"),
        ({"alpha_matting_erode_size": 1001}, "alpha_matting_erode_size"),
        ({"bgcolor": "1,2,3"}, "bgcolor"),
        ({"bgcolor": "1,2,3,256"}, "bgcolor"),
        ({"bgcolor": "red"}, "bgcolor"),
        ({"bgcolor": (1, 2, 3, 4, 5)}, "bgcolor"),
        ({"bgcolor": (1, 2, 3, -4)}, "bgcolor"),
        ({"alpha_matting": "perhaps"}, "alpha_matting"),
        # Text has one spelling, the one the OpenAPI schema publishes.
        ({"bgcolor": "01,2,3,4"}, "bgcolor"),
        ({"bgcolor": "1,2,3,+4"}, "bgcolor"),
        ({"bgcolor": "1,2,3,\t4"}, "bgcolor"),
        ({"post_process_mask": "1"}, "post_process_mask"),
        ({"only_mask": "yes"}, "only_mask"),
        ({"alpha_matting": "True"}, "alpha_matting"),
    ],
)
def test_parse_rejects_a_bad_option_naming_it(values: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(field)):
        Options.parse(values)


@pytest.mark.parametrize(
    "bgcolor", ["10,20,30,255", " 10, 20 ,30,255 ", (10, 20, 30, 255), [10, 20, 30, 255]]
)
def test_parse_accepts_bgcolor_as_string_or_sequence(bgcolor: Any) -> None:
    assert Options.parse({"bgcolor": bgcolor}).bgcolor == (10, 20, 30, 255)


def test_options_are_frozen() -> None:
    options = Options.parse({})
    with pytest.raises(ValueError, match="frozen"):
        options.only_mask = True  # type: ignore[misc]


def test_rembg_kwargs_are_every_option() -> None:
    kwargs = Options.parse({"bgcolor": "1,2,3,4", "alpha_matting": True}).rembg_kwargs()
    assert kwargs == {
        "alpha_matting": True,
        "alpha_matting_foreground_threshold": 240,
        "alpha_matting_background_threshold": 10,
        "alpha_matting_erode_size": 10,
        "only_mask": False,
        "post_process_mask": False,
        "bgcolor": (1, 2, 3, 4),
    }


def test_check_model_rejects_an_unknown_model_listing_choices() -> None:
    assert contract.check_model("u2netp") == "u2netp"
    with pytest.raises(InvalidRequest, match=r"unknown model 'nope'.*u2netp"):
        contract.check_model("nope")


# --- store layout ----------------------------------------------------------------------------


def test_input_name_is_sharded_by_digest() -> None:
    digest = "abcd" + "0" * 60
    assert contract.object_name(contract.INPUTS, digest) == f"inputs/ab/cd/{digest}"


def test_output_name_is_sharded_by_key_with_the_format_extension() -> None:
    key = key_of({})
    expected = f"results/{key[:2]}/{key[2:4]}/{key}.png"
    assert contract.object_name(contract.RESULTS, contract.result_name(key)) == expected
    assert contract.result_name(key, "jpeg") == f"{key}.jpg"
    assert contract.result_names(key) == [
        f"{key}{ext}" for ext in (".png", ".webp", ".jpg", ".zip")
    ]
    assert contract.name_digest(f"{key}.webp") == key


@pytest.mark.parametrize(
    ("fmt", "media_type"),
    [
        ("png", "image/png"),
        ("webp", "image/webp"),
        ("jpeg", "image/jpeg"),
        ("zip", "application/zip"),
    ],
)
def test_a_results_media_type_is_its_formats(fmt: str, media_type: str) -> None:
    assert contract.media_type(contract.result_name(key_of({}), fmt)) == media_type


def test_mask_name_names_input_model_and_pipeline() -> None:
    name = contract.mask_name(DIGEST, "u2netp")
    assert name == f"{DIGEST}-u2netp-v{contract.PIPELINE_VERSION}.png"
    assert contract.name_digest(name) == DIGEST
    assert contract.object_name(contract.MASKS, name) == f"masks/{DIGEST[:2]}/{DIGEST[2:4]}/{name}"


def test_guard_key_is_prefixed() -> None:
    assert contract.guard_key("k") == "bgq:guard:k"


# --- task arguments --------------------------------------------------------------------------


def good_kwargs() -> dict[str, Any]:
    args = TaskArgs.build(DIGEST, "u2netp", Options.parse({"bgcolor": "1,2,3,4"}))
    return json.loads(json.dumps(args.to_kwargs()))


def test_a_jobs_inputs_are_its_image_and_its_background() -> None:
    plain = TaskArgs.build(DIGEST, "u2netp", Options())
    assert plain.inputs == [DIGEST]
    over = TaskArgs.build(DIGEST, "u2netp", Options(bg_image=OTHER_DIGEST))
    assert over.inputs == [DIGEST, OTHER_DIGEST]
    assert contract.needed_inputs(over.to_kwargs()) == [DIGEST, OTHER_DIGEST]
    # Read leniently: a malformed message's end still releases what it names.
    assert contract.needed_inputs({"options": "?", "input_sha256": DIGEST}) == [DIGEST]
    assert contract.needed_inputs({"options": {"bg_image": OTHER_DIGEST}}) == [OTHER_DIGEST]
    assert contract.needed_inputs({}) == []


def test_task_args_round_trip_through_json() -> None:
    args = TaskArgs.build(
        DIGEST, "isnet-anime", Options.parse({"alpha_matting": True, "bgcolor": (5, 6, 7, 8)})
    )
    back = TaskArgs.from_kwargs(json.loads(json.dumps(args.to_kwargs())))
    assert back == args
    assert back.key == cache_key(DIGEST, "isnet-anime", args.options)
    assert back.pipeline_version == contract.PIPELINE_VERSION


# The options of the release before roi, scale, fit_megapixels and bg_image (de89114's Options).
RELEASED_OPTIONS = {
    "alpha_matting",
    "alpha_matting_foreground_threshold",
    "alpha_matting_background_threshold",
    "alpha_matting_erode_size",
    "only_mask",
    "post_process_mask",
    "bgcolor",
    "format",
    "quality",
    "crop",
    "crop_margin",
    "canvas",
    "padding",
    "position",
}


@pytest.mark.parametrize(
    "options", [{}, {"canvas": "800x600", "padding": "5%", "position": "bottom", "crop": True}]
)
def test_a_job_without_the_new_options_sends_what_an_older_worker_takes(
    options: dict[str, Any],
) -> None:
    """A rolling upgrade: an older worker refuses an option it does not know, even null."""
    kwargs = TaskArgs.build(DIGEST, "u2netp", Options.parse(options)).to_kwargs()
    assert set(kwargs["options"]) == RELEASED_OPTIONS
    assert set(kwargs) == {"key", "input_sha256", "model", "options", "pipeline_version"}


def test_a_job_with_the_new_options_sends_each_and_round_trips() -> None:
    new = {"roi": "1 2 50% 60%", "scale": "80%", "fit_megapixels": 0.5, "bg_image": OTHER_DIGEST}
    args = TaskArgs.build(DIGEST, "u2netp", Options.parse({**new, "position": "25% 100%"}))
    kwargs = json.loads(json.dumps(args.to_kwargs()))
    assert set(kwargs["options"]) == RELEASED_OPTIONS | set(new)
    assert {name: kwargs["options"][name] for name in new} == new
    assert TaskArgs.from_kwargs(kwargs) == args


def test_build_rejects_an_unknown_model() -> None:
    with pytest.raises(InvalidRequest, match="unknown model"):
        TaskArgs.build(DIGEST, "nope", Options())


def test_from_kwargs_rejects_a_tampered_key() -> None:
    kwargs = good_kwargs()
    kwargs["key"] = key_of({})
    with pytest.raises(InvalidRequest, match="key does not match"):
        TaskArgs.from_kwargs(kwargs)


def test_from_kwargs_rejects_options_that_do_not_match_the_key() -> None:
    kwargs = good_kwargs()
    kwargs["options"]["bgcolor"] = [9, 9, 9, 9]
    with pytest.raises(InvalidRequest, match="key does not match"):
        TaskArgs.from_kwargs(kwargs)


def test_from_kwargs_rejects_a_wrong_pipeline_version() -> None:
    kwargs = good_kwargs()
    kwargs["pipeline_version"] = "0"
    with pytest.raises(InvalidRequest, match="pipeline version '0'"):
        TaskArgs.from_kwargs(kwargs)


def test_from_kwargs_rejects_a_message_from_an_older_producer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kwargs = good_kwargs()
    monkeypatch.setattr(contract, "PIPELINE_VERSION", "999")
    with pytest.raises(InvalidRequest, match="different bgq versions"):
        TaskArgs.from_kwargs(kwargs)


def test_from_kwargs_rejects_an_unknown_model() -> None:
    kwargs = good_kwargs()
    kwargs["model"] = "nope"
    kwargs["key"] = cache_key(DIGEST, "nope", Options.parse(kwargs["options"]))
    with pytest.raises(InvalidRequest, match="unknown model 'nope'"):
        TaskArgs.from_kwargs(kwargs)


@pytest.mark.parametrize("where", ["top", "options"])
def test_from_kwargs_rejects_extra_fields(where: str) -> None:
    kwargs = good_kwargs()
    (kwargs if where == "top" else kwargs["options"])["extra"] = 1
    with pytest.raises(InvalidRequest, match="malformed task arguments"):
        TaskArgs.from_kwargs(kwargs)


def test_from_kwargs_rejects_a_missing_field() -> None:
    kwargs = good_kwargs()
    del kwargs["input_sha256"]
    with pytest.raises(InvalidRequest, match="malformed task arguments"):
        TaskArgs.from_kwargs(kwargs)


# --- models and imports ----------------------------------------------------------------------


def test_models_are_local_rembg_sessions_without_credentials() -> None:
    from rembg.sessions import sessions, sessions_names

    assert set(sessions_names) >= defaults.MODELS
    for name in defaults.MODELS:
        session = sessions[name]
        assert session.is_local(), name
        assert not session.requires_credentials(), name


def test_default_model_is_supported() -> None:
    from bgq import defaults

    assert defaults.MODEL in defaults.MODELS


def test_importing_the_contract_stays_light() -> None:
    code = (
        "import sys, bgq.contract; "
        "print(sorted(m for m in ('onnxruntime', 'rembg', 'celery', 'PIL') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ({"crop": True}, {"crop": True, "crop_margin": "0%"}),
        ({"crop": True, "crop_margin": "20"}, {"crop": True, "crop_margin": "20px"}),
        ({"crop": True, "crop_margin": "5%"}, {"crop": True, "crop_margin": "5.00%"}),
        ({"canvas": "10x10"}, {"canvas": "10x10", "padding": "0%", "position": "center"}),
        ({"format": "jpeg"}, {"format": "jpeg", "bgcolor": (255, 255, 255, 255)}),
        ({"format": "jpeg"}, {"format": "jpeg", "quality": 90}),
        ({}, {"format": "png", "quality": 50}),  # png ignores quality
    ],
)
def test_equivalent_output_options_share_a_key(one: dict[str, Any], other: dict[str, Any]) -> None:
    assert key_of(one) == key_of(other)


@pytest.mark.parametrize(
    "options",
    [
        {"format": "webp"},
        {"format": "jpeg", "quality": 80},
        {"crop": True},
        {"crop": True, "crop_margin": "5%"},
        {"canvas": "10x10"},
        {"canvas": "10x10", "position": "bottom"},
        {"format": "webp", "bgcolor": (255, 255, 255, 255)},
        {"format": "zip"},
        {"bg_image": OTHER_DIGEST},
        {"bg_image": OTHER_DIGEST, "format": "jpeg"},
    ],
)
def test_each_output_variant_has_its_own_key(options: dict[str, Any]) -> None:
    assert key_of(options) != key_of({})


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ({"format": "zip"}, {"format": "zip", "quality": 80}),  # its color.jpg's quality
        ({"format": "zip"}, {"format": "jpeg"}),
        ({"bg_image": DIGEST}, {"bg_image": OTHER_DIGEST}),  # the background's digest
        ({"bg_image": DIGEST}, {"bg_image": DIGEST, "crop": True}),
    ],
)
def test_zip_and_bg_image_variants_have_their_own_keys(
    one: dict[str, Any], other: dict[str, Any]
) -> None:
    assert key_of(one) != key_of(other)


def test_zip_and_bg_image_enter_the_canonical_form_only_when_set() -> None:
    assert "bg_image" not in Options().canonical()
    plain = Options().canonical()
    assert Options(format="zip").canonical() == {**plain, "format": "zip", "quality": 90}
    assert Options(bg_image=OTHER_DIGEST).canonical() == {**plain, "bg_image": OTHER_DIGEST}


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"bg_image": DIGEST.upper()}, "bg_image: must be the SHA-256 of a stored image"),
        ({"bg_image": DIGEST[:63]}, "bg_image: must be the SHA-256 of a stored image"),
        ({"bg_image": "../" + DIGEST[3:]}, "bg_image: must be the SHA-256 of a stored image"),
        ({"format": "tiff"}, "format: must be png, webp, jpeg or zip"),
        (
            {"format": "zip", "bgcolor": (1, 2, 3, 4)},
            "format: zip holds the subject's colours and alpha, not with a bgcolor",
        ),
        (
            {"format": "zip", "only_mask": True},
            "format: zip holds the subject's colours and alpha, not with only_mask=true",
        ),
        (
            {"format": "zip", "bg_image": DIGEST},
            "format: zip holds the subject's colours and alpha, not with a bg_image",
        ),
        (
            {"bg_image": DIGEST, "bgcolor": (1, 2, 3, 4)},
            "bg_image: sets the background, so not with a bgcolor",
        ),
        (
            {"bg_image": DIGEST, "only_mask": True},
            "bg_image: applies to a cutout, not with only_mask=true",
        ),
    ],
)
def test_zip_and_bg_image_refusals_name_the_option(values: dict[str, Any], error: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        Options.parse(values)
    assert str(refused.value).startswith(f"invalid options: {error}")


def test_bg_image_is_shaped_and_zip_is_not() -> None:
    """A background fills the final frame (rembg gets no bgcolor); a zip is an encoding."""
    assert Options(bg_image=DIGEST).shaped and not Options(format="zip").shaped


def test_a_percentage_is_at_most_100() -> None:
    with pytest.raises(InvalidRequest, match="crop_margin"):
        Options.parse({"crop": True, "crop_margin": "100.5%"})
    assert Options.parse({"crop": True, "crop_margin": "100.0%"}).crop


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({}, "4a23e8e384f4cb017bd47a15da883b53f451874c93e0da0171d705983ce3736a"),
        (
            {"bgcolor": (255, 255, 255, 255)},
            "aa51a9598165cbcce714e0bb80a50dc69fc2e1ff9f82fa4d8c114cc59aec9143",
        ),
        (
            {"only_mask": True, "post_process_mask": True},
            "b52ee3edc45b0be733fc85f92890cb19c41414e4628a8a9c6e8086b09ef4b614",
        ),
        (
            {"alpha_matting": True, "alpha_matting_erode_size": 5},
            "386a6c6353a1dd2a2f0d88bf4660c88420a81a3c0df4361062fe03ac9bc41fe6",
        ),
    ],
)
def test_keys_from_before_the_output_options_are_unchanged(
    options: dict[str, Any], key: str
) -> None:
    """Computed by the contract as it was before format, crop and canvas existed: stores keep
    serving their results after an upgrade."""
    assert key_of(options) == key


def test_counters_keep_their_redis_field_names() -> None:
    """Counter values are fields of STATS_KEY in running clusters: renaming one loses its count."""
    assert {counter.name: counter.value for counter in Counter} == {
        "CACHE_HITS": "cache_hits",
        "CACHE_MISSES": "cache_misses",
        "ENQUEUED": "enqueued",
        "COMPUTED": "computed",
        "SKIPPED": "skipped",
        "FAILED": "failed",
        "INFERENCES": "inferences",
    }
    assert contract.STATS_KEY == "bgq:stats"
    assert contract.OUTCOMES == (Counter.COMPUTED, Counter.SKIPPED, Counter.FAILED)
