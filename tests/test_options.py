"""The remove.bg-style shaping options (roi, scale, position, multi-value crop_margin,
fit_megapixels): parsing, the rules across options, and their canonical forms in the cache key."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from bgq.contract import TaskArgs, cache_key
from bgq.errors import InvalidRequest
from bgq.options import ROI_ORDER, Options

DIGEST = "0" * 64


def key_of(options: dict[str, Any]) -> str:
    return cache_key(DIGEST, "u2netp", Options.parse(options))


@pytest.mark.parametrize(
    ("options", "canonical", "key"),
    [
        (
            {"crop": True, "crop_margin": "5%"},
            {"crop": True, "crop_margin": "5%"},
            "e17bb4bbe162c86988aa9a6903c9208dd71f4188206c0e863dc13ffc77c5c3e5",
        ),
        (
            {"canvas": "1000x1000", "padding": "5%", "position": "bottom"},
            {"canvas": "1000x1000", "padding": "5%", "position": "bottom"},
            "16ef907a0698833e9fdbcffd1dd417ba389d3de4bd6fcf7ca5a07e3a09b149a1",
        ),
        (
            {"canvas": "500x500"},
            {"canvas": "500x500", "padding": "0px", "position": "center"},
            "39ba32b979c6b5bdbc119db60c41e29871215d1e7aaa96cd872af052677ee6a7",
        ),
        (
            {"crop": True, "crop_margin": "20px", "canvas": "800x600", "position": "top",
             "format": "webp"},
            {"format": "webp", "quality": 90, "crop": True, "crop_margin": "20px",
             "canvas": "800x600", "padding": "0px", "position": "top"},
            "689e3bbc1c508fbeea29afb69a394414e7e88fdef18cbba7ef3e5560543d18d2",
        ),
    ],
)  # fmt: skip
def test_shaped_keys_from_before_these_options_are_unchanged(
    options: dict[str, Any], canonical: dict[str, Any], key: str
) -> None:
    """Canonical forms and keys as main computed them before roi, scale and fit existed."""
    plain = {"alpha_matting": False, "post_process_mask": False, "bgcolor": None}
    assert Options.parse(options).canonical() == plain | canonical
    assert key_of(options) == key


@pytest.mark.parametrize(
    ("one", "other"),
    [
        # A roi of the whole image, in any spelling of it in %, is no roi.
        ({}, {"roi": "0% 0% 100% 100%"}),
        ({}, {"roi": "0 0px 100.0% 100.00%"}),
        ({"roi": "10px 5% 50% 90%"}, {"roi": "10 5.0% 50.00% 90%"}),
        # Positions equivalent to a keyword keep the keyword's key.
        ({"canvas": "10x10"}, {"canvas": "10x10", "position": "50%"}),
        ({"canvas": "10x10", "position": "top"}, {"canvas": "10x10", "position": "50% 0%"}),
        ({"canvas": "10x10", "position": "bottom"}, {"canvas": "10x10", "position": "50% 100%"}),
        ({"scale": "50%"}, {"scale": "50.0%", "position": "50% 50.00%"}),
        ({"scale": "original", "position": "20%"}, {"scale": "original", "position": "20% 20%"}),
        ({"position": "center"}, {"position": "50%"}),  # the default needs no canvas
        # A margin of four equal sides is one value; "TB LR" is its four sides.
        ({"crop": True, "crop_margin": "5%"}, {"crop": True, "crop_margin": "5% 5.0%"}),
        ({"crop": True, "crop_margin": "5%"}, {"crop": True, "crop_margin": "5% 5% 5% 5%"}),
        ({"crop": True, "crop_margin": "1 2"}, {"crop": True, "crop_margin": "1px 2 1 2px"}),
        ({"crop": True}, {"crop": True, "crop_margin": "0 0% 0px 0"}),
        # fit_megapixels to six significant digits, as text or a number.
        ({"fit_megapixels": 0.25}, {"fit_megapixels": "0.25"}),
        ({"fit_megapixels": 2}, {"fit_megapixels": "2.0000001"}),
    ],
)
def test_equivalent_spellings_share_a_key(one: dict[str, Any], other: dict[str, Any]) -> None:
    assert key_of(one) == key_of(other)


VARIANTS: list[dict[str, Any]] = [
    {},
    {"roi": "10% 0% 90% 100%"},
    {"roi": "10px 0px 90% 100%"},
    {"scale": "original"},
    {"scale": "50%"},
    {"scale": "50%", "position": "0% 100%"},
    {"scale": "100%"},
    {"crop": True, "crop_margin": "5% 10px"},
    {"crop": True, "crop_margin": "5%"},
    {"crop": True, "crop_margin": "1 2 3 4"},
    {"crop": True, "crop_margin": "4 3 2 1"},
    {"fit_megapixels": 1},
    {"fit_megapixels": 0.25},
    {"canvas": "10x10", "position": "25% 75%"},
    {"canvas": "10x10", "position": "75% 25%"},
]


def test_each_new_variant_has_its_own_key() -> None:
    assert len({key_of(options) for options in VARIANTS}) == len(VARIANTS)


@pytest.mark.parametrize(
    ("options", "field", "canonical"),
    [
        ({"roi": "10 5.0% 50.50% 90%"}, "roi", "10px 5% 50.5% 90%"),
        ({"roi": "0% 0 100% 50%"}, "roi", "0px 0px 100% 50%"),
        ({"crop": True, "crop_margin": "5% 10"}, "crop_margin", "5% 10px 5% 10px"),
        ({"crop": True, "crop_margin": "0 1 2.5% 3"}, "crop_margin", "0px 1px 2.5% 3px"),
        ({"scale": "33.30%"}, "scale", "33.3%"),
        ({"scale": "original"}, "scale", "original"),
        ({"scale": "original"}, "position", "center"),
        ({"scale": "80%", "position": "25%"}, "position", "25% 25%"),
        ({"canvas": "9x9", "position": "0% 100.0%"}, "position", "0% 100%"),
        ({"canvas": "9x9", "position": "33.33% 0%"}, "position", "33.33% 0%"),
        ({"fit_megapixels": "0.1234567"}, "fit_megapixels", 0.123456),  # cut, never up
        ({"fit_megapixels": "1.9999999"}, "fit_megapixels", 1.99999),
        ({"fit_megapixels": 0.2500005}, "fit_megapixels", 0.25),
        ({"fit_megapixels": "999.99999"}, "fit_megapixels", 999.999),
        ({"fit_megapixels": 0.29}, "fit_megapixels", 0.29),  # its own decimal, not 0.289999
        ({"fit_megapixels": "5e-324"}, "fit_megapixels", 5e-324),  # still over 0
        ({"fit_megapixels": "1e-05"}, "fit_megapixels", 1e-05),
        ({"fit_megapixels": 1000}, "fit_megapixels", 1000.0),
    ],
)
def test_canonical_forms(options: dict[str, Any], field: str, canonical: Any) -> None:
    assert Options.parse(options).canonical()[field] == canonical


# Values each new option refuses by itself (crop_margin with crop=true).
BAD: dict[str, list[Any]] = {
    "roi": ["1 2 3", "1 2 3 4 5", "1  2 3 4", " 1 2 3 4", "-1 0 9 9", "0 0 101% 100%",
            "0 0 1cm 1cm", "0,0,10,10", ""],
    "scale": ["5%", "9.99%", "101%", "100.5%", "50", "Original", ""],
    "position": ["left", "101%", "50% 50% 50%", "50%  50%", "-1%", "50", "center top",
                 "50%,50%"],
    "crop_margin": ["1 2 3", "1 2 3 4 5", "1,2", "5% ", "-1"],
    "fit_megapixels": ["0", "-1", "1000.1", "1001", "nan", "inf", "1_0", " 1", "abc", "", True,
                       0, -0.5, 1e9],
}  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value"), [(field, value) for field, values in BAD.items() for value in values]
)
def test_parse_rejects_a_bad_new_option_naming_it(field: str, value: Any) -> None:
    values = {field: value, "crop": field == "crop_margin"}
    with pytest.raises(InvalidRequest, match=f"invalid options: {re.escape(field)}: must be"):
        Options.parse(values)


@pytest.mark.parametrize(
    "values",
    [
        {"roi": "0 0 9 9"},
        {"roi": "99999px 99999px 100% 100%"},  # may be past the image: then all background
        {"roi": "10px 0 5% 100%"},  # units differ: the order is the image's business
        {"scale": "10%"},
        {"scale": "100.00%"},
        {"scale": "99.99%", "position": "100% 0%"},
        {"canvas": "9x9", "position": "0%"},
        {"canvas": "9x9", "position": "100% 33.33%"},
        {"crop": True, "crop_margin": "100% 0"},
        {"fit_megapixels": "1000"},
        {"fit_megapixels": ".5"},
        {"fit_megapixels": "1E-3"},
    ],
)
def test_parse_accepts(values: dict[str, Any]) -> None:
    assert Options.parse(values).shaped


@pytest.mark.parametrize(
    "roi", ["50% 0% 50% 100%", "0 60% 100% 40%", "10px 0 5px 9", "10px 0 0% 100%", "0 0 0 0"]
)
def test_a_roi_in_one_unit_must_have_its_corners_in_order(roi: str) -> None:
    with pytest.raises(InvalidRequest, match=f"roi: {re.escape(ROI_ORDER)}"):
        Options.parse({"roi": roi})


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"canvas": "10x10", "scale": "50%"}, "scale: applies only without a canvas"),
        ({"position": "top"}, "position: applies only with a canvas or scale"),
        ({"position": "50% 0%"}, "position: applies only with a canvas or scale"),
        ({"crop_margin": "0 5px"}, "crop_margin: applies only with crop=true"),
        ({"roi": "0 0 10 10", "crop_margin": "0 0 0 1"}, "crop_margin: applies only with crop"),
    ],
)
def test_rules_across_the_new_options(values: dict[str, Any], error: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(error)):
        Options.parse(values)


def test_only_real_transforms_are_shaped() -> None:
    assert not Options.parse({"roi": "0% 0% 100% 100%"}).shaped
    assert Options.parse({"roi": "0% 0% 100% 100%"}).roi is None
    assert not Options.parse({"position": "50% 50%"}).shaped
    color = {"bgcolor": "1,2,3,255"}
    assert Options.parse(color).rembg_kwargs()["bgcolor"] == (1, 2, 3, 255)  # rembg applies it
    for field, value in [("roi", "0 0 1 1"), ("scale", "original"), ("fit_megapixels", 1000)]:
        options = Options.parse({field: value, **color})
        assert options.shaped, field
        assert options.rembg_kwargs()["bgcolor"] is None  # applied after shaping


@pytest.mark.parametrize("options", VARIANTS[1:], ids=str)
def test_task_args_of_the_new_options_round_trip_through_json(options: dict[str, Any]) -> None:
    args = TaskArgs.build(DIGEST, "u2netp", Options.parse(options))
    assert TaskArgs.from_kwargs(json.loads(json.dumps(args.to_kwargs()))) == args
