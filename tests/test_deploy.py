"""The Docker deployment (docker-compose.yml, deploy/) against the code: no Docker, no network."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from bgq import defaults
from bgq.settings import ENV_PREFIX, Settings
from producer.cli import app

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / "deploy" / "bgq.env.example"
DEPLOY_README = ROOT / "deploy" / "README.md"

COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
BGQ_SERVICES = sorted(name for name in SERVICES if name != "redis")

# What a deployment sets; the example must document each of them.
DEPLOYMENT_SETTINGS = (
    "BGQ_CONCURRENCY", "BGQ_ORT_THREADS", "BGQ_MODEL", "BGQ_API_KEYS", "BGQ_WEBHOOK_SECRET",
    "BGQ_FLOWER_BASIC_AUTH", "BGQ_MAX_UPLOAD_MB", "BGQ_MAX_MEGAPIXELS", "BGQ_CACHE_MAX_AGE",
    "BGQ_CACHE_MAX_SIZE", "BGQ_PNG_ENCODER", "BGQ_MAX_TASKS_PER_CHILD",
    "BGQ_MAX_MEMORY_PER_CHILD_MB", "BGQ_ORT_ARENA", "BGQ_SHUTDOWN_GRACE",
)  # fmt: skip


# Variables the example shows that are not bgq's own: the AWS chain and MinIO's login.
NOT_BGQ = frozenset(
    {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "MINIO_ROOT_USER",
     "MINIO_ROOT_PASSWORD"}
)  # fmt: skip

# The CLI's usage errors. Newer typer vendors its own click, so take the class from typer itself.
USAGE_ERROR: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)


def parse_bgq(argv: list[str]) -> dict[str, Any]:
    """Parse `bgq ...` with the real CLI, without running it: unknown commands or options fail."""
    assert argv and argv[0] == "bgq", argv
    cmd: Any = typer.main.get_command(app)
    path, args = ["bgq"], list(argv[1:])
    while isinstance(getattr(cmd, "commands", None), dict):  # a group: resolve the subcommand
        if not args or args[0] not in cmd.commands:
            pytest.fail(f"`{' '.join(path)}` has no command {args[:1]}: {argv}")
        path.append(args.pop(0))
        cmd = cmd.commands[path[-1]]
    try:
        with cmd.make_context(" ".join(path), args, resilient_parsing=False) as ctx:
            return dict(ctx.params)
    except USAGE_ERROR as exc:
        pytest.fail(f"{argv}: {exc.format_message()}")  # type: ignore[attr-defined]


def mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """A service's volumes as (source, target, read_only), from the short or the long syntax."""
    found = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target, *mode = entry.split(":")
            found.append((source, target, "ro" in ",".join(mode).split(",")))
        else:
            found.append((entry["source"], entry["target"], bool(entry.get("read_only"))))
    return found


def env_example_names() -> list[str]:
    """The variables bgq.env.example sets or shows (commented out)."""
    pattern = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=", re.MULTILINE)
    return pattern.findall(ENV_EXAMPLE.read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = (line.strip() for line in text.splitlines())
    pairs = (line.split(None, 1) for line in lines if line and not line.startswith("#"))
    return [(words[0].upper(), words[1] if len(words) > 1 else "") for words in pairs]


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the Dockerfile's last stage (the image that runs)."""
    instructions = dockerfile_instructions()
    start = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[start:]


def env_assignments(args: str) -> dict[str, str]:
    """The KEY=value pairs of an ENV instruction."""
    return dict(word.split("=", 1) for word in shlex.split(args))


@pytest.mark.parametrize("name", BGQ_SERVICES)
def test_service_command_is_a_real_bgq_command(name: str) -> None:
    command = SERVICES[name].get("command")
    assert isinstance(command, list) and command[:1] == ["bgq"], f"{name}: {command!r}"
    assert all(isinstance(word, str) for word in command), f"{name}: {command!r}"
    parse_bgq(command)


def test_parse_bgq_rejects_what_the_cli_would() -> None:
    assert parse_bgq(["bgq", "ingest", "src", "--out", "o", "--window", "4"])["window"] == 4
    assert parse_bgq(["bgq", "models", "fetch", "u2netp"])["name"] == "u2netp"
    for argv in (["bgq", "nosuch"], ["bgq", "status", "--nosuch"], ["bgq", "models", "nosuch"]):
        with pytest.raises(pytest.fail.Exception):
            parse_bgq(argv)


def shell_blocks(markdown: str) -> list[str]:
    """The contents of the fenced code blocks marked sh, bash or console, or not marked."""
    blocks: list[str] = []
    current: list[str] = []
    fence: str | None = None
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            if fence is None:
                fence, current = line.lstrip()[3:].strip(), []
            else:
                if fence in ("", "sh", "bash", "console"):
                    blocks.append("\n".join(current))
                fence = None
        elif fence is not None:
            current.append(line)
    assert fence is None, "unclosed code block"
    return blocks


def bgq_commands(script: str) -> list[list[str]]:
    """Each `bgq ...` invocation in a shell snippet, wherever it stands on its line."""
    found = []
    for line in script.replace("\\\n", " ").splitlines():
        segment: list[str] = []
        for word in [*shlex.split(line, comments=True), ";"]:
            if word not in ("&&", "||", ";", "|"):
                segment.append(word)
                continue
            starts = [i for i, w in enumerate(segment) if "=" not in w and Path(w).name == "bgq"]
            if starts:
                found.append(["bgq", *segment[starts[0] + 1 :]])
            segment = []
    return found


def test_commands_in_the_deploy_readme_are_real_bgq_commands() -> None:
    commands = [c for block in shell_blocks(DEPLOY_README.read_text()) for c in bgq_commands(block)]
    assert commands, "deploy/README.md shows no bgq command"
    problems = []
    for argv in commands:
        try:
            parse_bgq(argv)
        except pytest.fail.Exception as exc:
            problems.append(str(exc))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_long_running_service_restarts_and_has_a_healthcheck(name: str) -> None:
    service = SERVICES[name]
    assert service.get("restart") == "unless-stopped", name
    check = service.get("healthcheck", {})
    assert not check.get("disable"), name
    test = check.get("test")
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name


@pytest.mark.parametrize("name", BGQ_SERVICES)
def test_healthcheck_and_published_port_match_the_listening_port(name: str) -> None:
    service = SERVICES[name]
    command = service["command"]
    if "--port" not in command:
        assert "ports" not in service, f"{name} publishes a port but sets no --port"
        return
    port = command[command.index("--port") + 1]
    assert f"127.0.0.1:{port}/" in " ".join(service["healthcheck"]["test"]), name
    container_ports = [str(p).split(":")[-1].split("/")[0] for p in service.get("ports", [])]
    assert container_ports == [port], name


def test_bgq_services_share_one_image_and_its_build_files_exist() -> None:
    images = {(SERVICES[n].get("image"), repr(SERVICES[n].get("build"))) for n in BGQ_SERVICES}
    assert len(images) == 1, images
    build = SERVICES["worker"]["build"]
    context = ROOT / build["context"]
    assert context.is_dir()
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE


def test_env_files_exist_or_have_an_example() -> None:
    entries = []
    for name, service in SERVICES.items():
        listed = service.get("env_file", [])
        for entry in [listed] if isinstance(listed, str) else listed:
            entries.append((name, {"path": entry} if isinstance(entry, str) else entry))
    assert entries, "no service reads an env_file"
    for name, entry in entries:
        path = ROOT / entry["path"]
        if entry.get("required", True):
            assert path.is_file(), f"{name}: required env_file {path} is missing"
        else:
            example = path.with_name(path.name + ".example")
            assert example == ENV_EXAMPLE, f"{name}: {path} is optional, copied from what?"
    assert ENV_EXAMPLE.is_file()


def test_worker_and_api_share_the_store_volume_at_bgq_home() -> None:
    worker, api = mounts(SERVICES["worker"]), mounts(SERVICES["api"])
    home = SERVICES["worker"]["environment"]["BGQ_HOME"]
    assert SERVICES["api"]["environment"]["BGQ_HOME"] == home
    store = [(source, target) for source, target, ro in worker if target == home and not ro]
    assert len(store) == 1, worker
    source = store[0][0]
    assert (source, home, False) in api
    assert source in (COMPOSE.get("volumes") or {}), f"volume {source!r} is not declared"
    for name in BGQ_SERVICES:
        for src, target, _ in mounts(SERVICES[name]):
            if src == source:
                assert target == home, f"{name} mounts the store at {target}, not {home}"
    assert (source, home, True) in mounts(SERVICES["exporter"])


def test_redis_persists_and_never_evicts() -> None:
    redis = SERVICES["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    flags = dict(zip(command[1::2], command[2::2], strict=True))
    assert flags.get("--appendonly") == "yes"
    assert flags.get("--maxmemory-policy") == "noeviction"
    volumes = COMPOSE.get("volumes") or {}
    assert any(src in volumes and target == "/data" for src, target, _ in mounts(redis))


def test_every_bgq_service_reaches_the_redis_service() -> None:
    for name in BGQ_SERVICES:
        service = SERVICES[name]
        url = service["environment"]["BGQ_REDIS_URL"]
        assert "redis://redis:6379/" in url, f"{name}: {url}"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_worker_scales_and_beat_does_not() -> None:
    worker = SERVICES["worker"]
    for key in ("container_name", "hostname", "ports"):
        assert key not in worker, f"worker sets {key}: `--scale worker=N` needs unique ones"
    # The node bgq@<container hostname> (`bgq worker`'s default name, `bgq probe`'s default).
    for name in ("worker", "webhooks"):
        assert SERVICES[name]["healthcheck"]["test"] == ["CMD", "bgq", "probe", "ready"], name
        parse_bgq(SERVICES[name]["healthcheck"]["test"][1:])
        assert not any(a in SERVICES[name]["command"] for a in ("-n", "--hostname")), name
    assert SERVICES["beat"].get("deploy", {}).get("replicas", 1) == 1


def seconds(period: str) -> float:
    """A Compose duration such as `30s` or `1m30s`, in seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", period)
    assert parts and "".join(n + u for n, u in parts) == period, period
    return sum(float(n) * units[u] for n, u in parts)


@pytest.mark.parametrize("name", ["worker", "webhooks"])
def test_workers_stop_on_sigterm_with_the_grace_and_a_margin(name: str) -> None:
    """`docker compose stop` waits the worker's BGQ_SHUTDOWN_GRACE plus the margin to hand the
    rest back (workers/shutdown.py) before its SIGKILL."""
    service = SERVICES[name]
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM", name
    wanted = defaults.SHUTDOWN_GRACE + defaults.SHUTDOWN_MARGIN
    assert seconds(service["stop_grace_period"]) >= wanted, name


def strings(node: object) -> list[str]:
    """Every string in a parsed YAML document, keys included."""
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in strings(key) + strings(value)]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [node] if isinstance(node, str) else []


def test_interpolated_variables_are_documented_settings() -> None:
    documented = set(env_example_names())
    settings = {ENV_PREFIX + field.upper() for field in Settings.model_fields}
    pattern = re.compile(r"\$(?:\$|\{(\w+)|(\w+))")  # `$$` is a literal `$`, not interpolation
    names = [
        m[1] or m[2] for text in strings(COMPOSE) for m in pattern.finditer(text) if m[0] != "$$"
    ]
    assert "BGQ_CONCURRENCY" in names and "BGQ_ORT_THREADS" in names, names
    for name in names:
        assert name in settings, f"${{{name}}} in docker-compose.yml is not a bgq setting"
        assert name in documented, f"${{{name}}} is not in {ENV_EXAMPLE.name}"


def test_env_example_documents_real_settings() -> None:
    names = env_example_names()
    settings = {ENV_PREFIX + field.upper() for field in Settings.model_fields}
    assert len(names) == len(set(names)), "a setting is listed twice"
    missing = sorted(set(DEPLOYMENT_SETTINGS) - set(names))
    assert not missing, f"undocumented in {ENV_EXAMPLE.name}: {missing}"
    unknown = sorted(set(names) - settings - NOT_BGQ)
    assert not unknown, f"not settings of bgq.settings (bgq would ignore them): {unknown}"


def test_dockerfile_runs_as_a_user_with_verified_weights_baked_in() -> None:
    instructions = dockerfile_instructions()
    assert all(
        args.split()[0].startswith("python:3.11-slim") for op, args in instructions if op == "FROM"
    )
    stage = final_stage()
    users = [args for op, args in stage if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert not any(op == "ENTRYPOINT" for op, _ in instructions)
    env = {k: v for op, args in stage if op == "ENV" for k, v in env_assignments(args).items()}
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("BGQ_HOME") == SERVICES["worker"]["environment"]["BGQ_HOME"]
    models_dir = env.get("BGQ_MODELS_DIR")
    assert models_dir and not models_dir.startswith(env["BGQ_HOME"]), (
        "weights must not be on the store"
    )
    fetch = [args for op, args in instructions if op == "RUN" and "bgq models fetch" in args]
    assert fetch and f"BGQ_MODELS_DIR={models_dir}" in fetch[0], fetch
    copies = [args.split() for op, args in stage if op == "COPY" and "--from" in args]
    assert any(words[-1] == models_dir for words in copies), "the weights are not in the image"


def test_dockerfile_copies_only_what_the_build_context_keeps() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for op, args in dockerfile_instructions():
        if op != "COPY" or "--from" in args:
            continue
        *sources, _dest = (word for word in args.split() if not word.startswith("--"))
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source.rstrip("/") not in ignored, f"COPY {source}: excluded by .dockerignore"
    assert {".git", ".venv", "deploy/bgq.env"} <= ignored


# -- the S3 variant (docker-compose.s3.yml) ------------------------------------------------

S3_OVERRIDE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.s3.yml").read_text())


def test_s3_override_points_every_bgq_service_at_the_minio_bucket() -> None:
    services = S3_OVERRIDE["services"]
    assert set(BGQ_SERVICES) <= set(services), "every bgq service needs the S3 settings"
    for name in BGQ_SERVICES:
        env = services[name]["environment"]
        values = {k.removeprefix(ENV_PREFIX).lower(): v for k, v in env.items() if "BGQ_" in k}
        settings = Settings(**values)  # a real, valid store setting
        assert settings.store_bucket == ("bgq", "store/"), name
        assert env["BGQ_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
        after = services[name]["depends_on"]
        assert after["minio-bucket"]["condition"] == "service_completed_successfully"
        assert after["redis"]["condition"] == "service_healthy"  # kept from the base file
    assert "minio" in services and "healthcheck" in services["minio"]
    script = " ".join(services["minio-bucket"]["entrypoint"])
    assert "mc mb --ignore-existing local/bgq" in script
    assert services["minio-bucket"]["restart"] == "no"


def test_s3_override_is_documented() -> None:
    text = DEPLOY_README.read_text()
    assert "docker-compose.s3.yml" in text and "MINIO_ROOT_PASSWORD" in text
    assert "MINIO_ROOT_PASSWORD" in ENV_EXAMPLE.read_text()
