"""docker-compose.yml: validated by docker-compose itself, and its services' exact commands run
as local processes (no Docker engine here), with the local PostgreSQL standing in for ``db``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tauopt.study import load_config

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parent.parent
SMALL = "[study]\nn_trials = 4\n[trial]\nepochs = 1\ntrain_size = 1000\nval_size = 2000\n"


def _compose(*args: str, env_file: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("Debian's docker-compose is needed to validate the file; .ci/run installs it")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "TAUOPT_"))}
    return subprocess.run(
        [
            binary,
            "--project-directory",
            str(REPO),
            "-f",
            str(REPO / "docker-compose.yml"),
            "--env-file",
            str(env_file),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.fixture()
def resolved(tmp_path: Path) -> dict[str, Any]:
    env_file = tmp_path / "compose.env"
    study = f"compose-{uuid.uuid4().hex[:8]}"
    env_file.write_text(
        f"POSTGRES_USER=postgres\nPOSTGRES_PASSWORD=unused-trust-auth\nPOSTGRES_DB=test\nTAUOPT_STUDY={study}\n"
    )
    done = _compose("config", env_file=env_file)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    config["study"] = study
    return config


def test_file_is_valid_and_complete(resolved: dict[str, Any], tmp_path: Path) -> None:
    services = resolved["services"]
    assert {"db", "create", "worker", "worker-gpu", "dashboard"} <= set(services)
    assert "healthcheck" in services["db"] and "pgdata" in resolved["volumes"]
    assert services["create"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert (
        services["worker"]["depends_on"]["create"]["condition"] == "service_completed_successfully"
    )
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and services["worker-gpu"]["profiles"] == ["gpu"]
    assert any("8080" in str(p) for p in services["dashboard"]["ports"])
    for name in ("worker", "dashboard"):
        assert any("artifacts" in str(v) for v in services[name]["volumes"])
    # the shipped study config is valid
    load_config(REPO / "configs" / "study.toml")


def test_credentials_come_from_the_env_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    done = _compose("config", "-q", env_file=empty)
    assert done.returncode != 0
    assert (
        "set POSTGRES_USER in .env" in done.stderr or "set POSTGRES_PASSWORD in .env" in done.stderr
    )
    text = (REPO / "docker-compose.yml").read_text()
    passwords = re.findall(r"^\s*POSTGRES_PASSWORD:\s*(\S+)", text, flags=re.MULTILINE)
    assert passwords and all(p.strip('"').startswith("${") for p in passwords), (
        "no baked-in password"
    )


def _entrypoint() -> list[str]:
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT"):
            return list(json.loads(line.removeprefix("ENTRYPOINT").strip()))
    raise AssertionError("Dockerfile has no ENTRYPOINT")


def _process(
    service: dict[str, Any], volumes: dict[str, Path], **popen: Any
) -> subprocess.Popen[str]:
    """Run a service's exact command the way its image would: ENTRYPOINT + command, with the
    service's environment; container paths map to local folders, the host db to localhost."""
    assert _entrypoint() == ["tauopt"]
    args = [str(a) for a in service["command"]]
    env = dict(os.environ)
    for key, value in service["environment"].items():
        env[key] = str(value).replace("@db:5432", "@127.0.0.1:5432")
    for container, local in volumes.items():
        args = [str(local) + a[len(container) :] if a.startswith(container) else a for a in args]
        env = {
            k: (str(local) + v[len(container) :] if v.startswith(container) else v)
            for k, v in env.items()
        }
    return subprocess.Popen([sys.executable, "-m", "tauopt", *args], env=env, text=True, **popen)


def test_service_commands_run_against_postgres(
    resolved: dict[str, Any], tmp_path: Path, data_dir: Path
) -> None:
    services = resolved["services"]
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "study.toml").write_text(SMALL)  # stands in for ./configs at /config
    volumes = {"/config": config_dir, "/artifacts": tmp_path / "artifacts", "/data": data_dir}

    create = _process(services["create"], volumes)
    assert create.wait(timeout=120) == 0
    workers = [
        _process(services["worker"], volumes, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs

    url = services["worker"]["environment"]["TAUOPT_STORAGE"].replace("@db:5432", "@127.0.0.1:5432")
    study = optuna.load_study(study_name=resolved["study"], storage=url)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4

    dashboard = _process(
        services["dashboard"], volumes, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen("http://127.0.0.1:8080/api/studies", timeout=5) as r:
                    names = [s["study_name"] for s in json.load(r)["study_summaries"]]
                break
            except OSError:
                if dashboard.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"dashboard service did not serve on 8080: {dashboard.communicate()[0]}"
                    )
                time.sleep(0.3)
        assert resolved["study"] in names
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=10)
