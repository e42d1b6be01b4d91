"""Settings: defaults, one BGQ_* variable per field, errors that name the bad variable."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bgq import contract, defaults, quotas
from bgq.errors import ConfigError
from bgq.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No BGQ_* variable from the caller's shell; defaults land under a temporary XDG dir."""
    for name in list(os.environ):
        if name.startswith("BGQ_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings()
    home = tmp_path / "xdg" / "bgq"
    assert settings.redis_url is None
    assert settings.home == home
    assert settings.model_home == home / "models"
    assert settings.store_dir == home / "store"
    assert settings.run_dir == home / "run"
    assert settings.model == "u2netp"
    assert settings.concurrency == (os.cpu_count() or 1)
    assert settings.ort_threads == defaults.ORT_THREADS
    assert settings.ort_arena is defaults.ORT_ARENA
    assert settings.max_tasks_per_child == defaults.MAX_TASKS_PER_CHILD
    assert settings.max_memory_per_child_mb == defaults.MAX_MEMORY_PER_CHILD_MB
    assert settings.max_megapixels == defaults.MAX_MEGAPIXELS
    assert settings.png_compress_level == defaults.PNG_COMPRESS_LEVEL


def test_home_defaults_to_local_share_without_xdg(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_settings().home == tmp_path / ".local" / "share" / "bgq"


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("BGQ_REDIS_URL", "redis://cache:6380/2", "redis_url", "redis://cache:6380/2"),
        ("BGQ_REDIS_URL", "rediss://cache:6380/0", "redis_url", "rediss://cache:6380/0"),
        ("BGQ_HOME", "/srv/bgq-home", "home", Path("/srv/bgq-home")),
        ("BGQ_MODELS_DIR", "/srv/weights", "model_home", Path("/srv/weights")),
        ("BGQ_MODEL", "isnet-anime", "model", "isnet-anime"),
        ("BGQ_CONCURRENCY", "97", "concurrency", 97),
        ("BGQ_ORT_THREADS", "3", "ort_threads", 3),
        ("BGQ_ORT_ARENA", "false", "ort_arena", False),
        ("BGQ_ORT_ARENA", "0", "ort_arena", False),
        ("BGQ_MAX_TASKS_PER_CHILD", "7", "max_tasks_per_child", 7),
        ("BGQ_MAX_MEMORY_PER_CHILD_MB", "512", "max_memory_per_child_mb", 512),
        ("BGQ_MAX_MEGAPIXELS", "12.5", "max_megapixels", 12.5),
        ("BGQ_PNG_COMPRESS_LEVEL", "1", "png_compress_level", 1),
        ("BGQ_PNG_ENCODER", "pillow", "png_encoder", "pillow"),
    ],
)
def test_each_variable_is_read(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str, expected: Any
) -> None:
    assert getattr(load_settings(), field) != expected
    monkeypatch.setenv(variable, value)
    assert getattr(load_settings(), field) == expected


def test_models_dir_follows_bgq_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BGQ_HOME", str(tmp_path / "h"))
    settings = load_settings()
    assert settings.model_home == tmp_path / "h" / "models"
    assert settings.store_dir == tmp_path / "h" / "store"


def test_relative_and_user_paths_become_absolute(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("BGQ_HOME", "relative/home")
    monkeypatch.setenv("BGQ_MODELS_DIR", "~/weights")
    settings = load_settings()
    assert settings.home == tmp_path / "relative" / "home"
    assert settings.model_home == tmp_path / "user" / "weights"


def test_an_empty_variable_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BGQ_MODEL", "")
    monkeypatch.setenv("BGQ_REDIS_URL", "")
    settings = load_settings()
    assert settings.model == defaults.MODEL
    assert settings.redis_url is None


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BGQ_CONCURRENCY", "abc"),
        ("BGQ_CONCURRENCY", "0"),
        ("BGQ_MODEL", "nope"),
        ("BGQ_REDIS_URL", "http://x"),
        ("BGQ_ORT_ARENA", "maybe"),
        ("BGQ_ORT_THREADS", "-1"),
        ("BGQ_MAX_TASKS_PER_CHILD", "many"),
        ("BGQ_MAX_MEMORY_PER_CHILD_MB", "10"),
        ("BGQ_MAX_MEGAPIXELS", "0"),
        ("BGQ_PNG_COMPRESS_LEVEL", "12"),
    ],
)
def test_a_bad_value_raises_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert f"{variable}={value!r}" in str(info.value)


def test_every_bad_variable_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BGQ_CONCURRENCY", "0")
    monkeypatch.setenv("BGQ_MODEL", "nope")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "BGQ_CONCURRENCY" in str(info.value)
    assert "BGQ_MODEL" in str(info.value)


def test_unknown_bgq_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BGQ_NOT_A_SETTING", "x")
    assert load_settings().model == defaults.MODEL


def test_unknown_model_message_lists_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BGQ_MODEL", "nope")
    with pytest.raises(ConfigError) as info:
        load_settings()
    choices = ", ".join(sorted(defaults.MODELS))
    assert (
        str(info.value)
        == f"invalid setting BGQ_MODEL='nope': unknown model; choose one of {choices}"
    )


def test_settings_import_nothing_of_bgq_above_them() -> None:
    """Settings sit at the bottom: defaults, errors, units and urls, no connection, no store."""
    code = (
        "import sys, bgq.settings; print(' '.join(m for m in sys.modules if m.startswith('bgq')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert set(loaded) <= {
        "bgq",
        "bgq.settings",
        "bgq.defaults",
        "bgq.errors",
        "bgq.units",
        "bgq.urls",
        "bgq.quotas",
    }


def test_api_limits_by_key_id_over_every_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    special = quotas.key_id("special-key")
    monkeypatch.setenv("BGQ_API_KEYS", "plain-key,special-key")
    monkeypatch.setenv(
        "BGQ_API_LIMITS",
        f"* : interactive.rpm=600, interactive.jobs=20 bulk.jobs=2000 ;\n"
        f"  {special}: bulk.jobs=50000 interactive.rpm=none;",
    )
    table = load_settings().api_limit_table
    assert quotas.limits_for(table, quotas.key_id("plain-key")) == {
        ("interactive", "rpm"): 600,
        ("interactive", "jobs"): 20,
        ("bulk", "jobs"): 2000,
    }
    assert quotas.limits_for(table, special) == {
        ("interactive", "jobs"): 20,
        ("bulk", "jobs"): 50000,
    }
    assert special == hashlib.sha256(b"special-key").hexdigest()[:12]
    assert quotas.LANES == contract.LANES  # the bottom's copy of the contract's lanes


@pytest.mark.parametrize(
    ("keys", "limits", "message"),
    [
        ("k", "*: fast.rpm=3", "'fast.rpm=3' is not <lane>.<kind>=<n|none>"),
        ("k", "*: bulk.hour=3", "'bulk.hour=3' is not"),
        ("k", "*: bulk.rpm=0", "a limit is at least 1"),
        ("k", "*: bulk.rpm=-1", "'bulk.rpm=-1' is not"),
        ("k", "*:", "*: no limits"),
        ("k", "bulk.rpm=3", "entry 1 has no `:`; each entry is"),
        ("k", "*: bulk.rpm=3; secret-key: bulk.rpm=3", "entry 2 names something that is not"),
        ("k", "*: secret-key bulk.rpm=3", "*: rule 1 is not <lane>.<kind>"),
        ("k", "*: bulk.rpm=3; *: bulk.jobs=3", "'*' has two entries"),
        ("k", "0123456789ab: bulk.rpm=3", "names key id 0123456789ab, which is no key"),
        (None, "*: bulk.rpm=3", "BGQ_API_LIMITS needs BGQ_API_KEYS"),
    ],
)
def test_bad_api_limits_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, keys: str | None, limits: str, message: str
) -> None:
    if keys:
        monkeypatch.setenv("BGQ_API_KEYS", keys)
    monkeypatch.setenv("BGQ_API_LIMITS", limits)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "BGQ_API_LIMITS" in str(info.value) and message in str(info.value)
    assert "secret-key" not in str(info.value) and f"={limits!r}" not in str(info.value)


def test_a_key_written_for_its_id_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    """The easy mistake, a raw key where its id belongs: neither the key nor the setting's
    value is in the error, which every process that reads the settings would print."""
    limits = "supersecretkey123: bulk.rpm=3"
    monkeypatch.setenv("BGQ_API_KEYS", "supersecretkey123")
    monkeypatch.setenv("BGQ_API_LIMITS", limits)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "BGQ_API_LIMITS='(hidden)'" in message
    assert "not a key id (12 hex digits, `bgq api --key-ids` prints them) or `*`" in message
    assert "supersecretkey" not in message and limits not in message
