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
LOCAL_PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
SMALL = "[study]\nn_trials = 4\n[trial]\nepochs = 1\ntrain_size = 1000\nval_size = 2000\n"


def _compose(
    *args: str, env_file: Path, files: tuple[str, ...] = ("docker-compose.yml",)
) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("Debian's docker-compose is needed to validate the file; .ci/run installs it")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "TAUOPT_"))}
    return subprocess.run(
        [
            binary,
            "--project-directory",
            str(REPO),
            *(arg for name in files for arg in ("-f", str(REPO / name))),
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
    assert {"db", "create", "data", "worker", "worker-gpu", "proxy", "dashboard"} <= set(services)
    assert services["proxy"]["command"][0] == "proxy" and "ports" not in services["proxy"]
    assert "healthcheck" in services["db"] and "pgdata" in resolved["volumes"]
    assert services["create"]["depends_on"]["db"]["condition"] == "service_healthy"
    for name in ("worker", "worker-gpu"):
        for needs in ("create", "data"):  # the study exists and the data is downloaded, once
            condition = services[name]["depends_on"][needs]["condition"]
            assert condition == "service_completed_successfully"
    # a GPU worker that cannot see its GPU fails instead of training on the CPU
    assert services["worker-gpu"]["command"][-2:] == ["--device", "cuda"]
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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "TAUOPT_"))}
    for key, value in service["environment"].items():
        env[key] = "127.0.0.1" if key == "PGHOST" and value == "db" else str(value)
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
    data = _process(services["data"], volumes)
    assert data.wait(timeout=120) == 0  # the files are there: checked, nothing downloaded
    workers = [
        _process(services["worker"], volumes, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs

    study = optuna.load_study(study_name=resolved["study"], storage=LOCAL_PG)
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


NASTY = 'p@ss/w:rd#%1?&= "x"'


def test_any_password_reaches_postgres_intact(tmp_path: Path) -> None:
    """The password goes through PGPASSWORD, not a URL: '@', '/', ':', '#', '%', '?', spaces."""
    env_file = tmp_path / "compose.env"
    env_file.write_text(f"POSTGRES_USER=postgres\nPOSTGRES_PASSWORD='{NASTY}'\nPOSTGRES_DB=test\n")
    done = _compose("config", env_file=env_file)
    assert done.returncode == 0, done.stderr
    worker = yaml.safe_load(done.stdout)["services"]["worker"]
    assert worker["environment"]["PGPASSWORD"] == NASTY
    probe = (
        "from tauopt.storage import StorageSettings, open_storage, resolve_url\n"
        "storage = open_storage(StorageSettings(url=resolve_url()), create_schema=False)\n"
        "with storage.engine.connect() as c:\n"
        "    user = c.exec_driver_sql('select current_user').scalar()\n"
        "    print(user, c.connection.dbapi_connection.info.password)\n"
    )
    out = _process_output(worker, probe)
    assert out.strip() == f"postgres {NASTY}"


def _process_output(service: dict[str, Any], code: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "TAUOPT_"))}
    for key, value in service["environment"].items():
        env[key] = "127.0.0.1" if key == "PGHOST" and value == "db" else str(value)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _published(port: str | dict[str, Any]) -> tuple[str, str]:
    """(host address, host port) of a resolved port entry: docker-compose 1.29 keeps the short
    syntax ("127.0.0.1:13000:13000"), the compose specification's tools write the long one."""
    if isinstance(port, dict):
        return str(port["host_ip"]), str(port["published"])
    host_ip, published, _target = port.rsplit(":", 2)
    return host_ip, published


def test_multihost_files_are_valid(tmp_path: Path) -> None:
    env_file = tmp_path / "compose.env"
    env_file.write_text(
        "POSTGRES_USER=u\nPOSTGRES_PASSWORD=p\nPOSTGRES_DB=d\nTAUOPT_PROXY_HOST=main.example\n"
        "TAUOPT_ARTIFACTS_DIR=/srv/tauopt-artifacts\nTAUOPT_PROXY_SECRET=shared-secret-0123456789\n"
    )
    main = _compose(
        "config",
        env_file=env_file,
        files=("docker-compose.yml", "docker-compose.multihost.yml"),
    )
    assert main.returncode == 0, main.stderr
    config = yaml.safe_load(main.stdout)
    (port,) = config["services"]["proxy"]["ports"]
    assert _published(port) == ("127.0.0.1", "13000")  # unless told
    assert config["services"]["proxy"]["environment"]["TAUOPT_PROXY_SECRET"]
    assert "ports" not in config["services"]["db"]  # the database stays inside
    assert config["volumes"]["artifacts"]["driver_opts"]["device"] == "/srv/tauopt-artifacts"
    remote = _compose("config", env_file=env_file, files=("docker-compose.worker.yml",))
    assert remote.returncode == 0, remote.stderr
    services = yaml.safe_load(remote.stdout)["services"]
    assert set(services) == {"data", "worker"}
    environment = services["worker"]["environment"]
    assert environment["TAUOPT_STORAGE"] == "grpc://main.example:13000"
    assert environment["TAUOPT_PROXY_SECRET"] == "shared-secret-0123456789"
    # told otherwise: published where the worker hosts reach it; and never without a secret
    told = env_file.read_text() + "TAUOPT_PROXY_BIND=10.0.0.5\n"
    env_file.write_text(told)
    files = ("docker-compose.yml", "docker-compose.multihost.yml")
    main = _compose("config", env_file=env_file, files=files)
    (port,) = yaml.safe_load(main.stdout)["services"]["proxy"]["ports"]
    assert _published(port) == ("10.0.0.5", "13000")
    env_file.write_text(told.replace("TAUOPT_PROXY_SECRET=shared-secret-0123456789\n", ""))
    refused = _compose("config", env_file=env_file, files=files)
    assert refused.returncode != 0 and "TAUOPT_PROXY_SECRET" in refused.stderr
    assert not [k for k in environment if k.startswith(("PG", "POSTGRES"))]  # no credentials


def test_a_worker_host_needs_only_the_proxys_address(
    resolved: dict[str, Any], tmp_path: Path, data_dir: Path
) -> None:
    """The main host's create and proxy services, and the worker of docker-compose.worker.yml
    with nothing but the proxy's address: the study runs to its budget."""
    services = resolved["services"]
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "study.toml").write_text(SMALL)
    volumes = {"/config": config_dir, "/artifacts": tmp_path / "artifacts", "/data": data_dir}
    assert _process(services["create"], volumes).wait(timeout=120) == 0
    proxy = _process(services["proxy"], volumes, stderr=subprocess.PIPE)
    try:
        env_file = tmp_path / "worker.env"
        env_file.write_text(
            f"TAUOPT_PROXY_HOST=127.0.0.1\nTAUOPT_STUDY={resolved['study']}\n"
            "TAUOPT_PROXY_SECRET=shared-secret-0123456789\n"
            f"TAUOPT_ARTIFACTS_DIR={tmp_path / 'artifacts'}\n"
        )
        remote = _compose("config", env_file=env_file, files=("docker-compose.worker.yml",))
        assert remote.returncode == 0, remote.stderr
        worker = yaml.safe_load(remote.stdout)["services"]["worker"]
        time.sleep(5)  # the proxy starts listening
        run = _process(worker, volumes, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = run.communicate(timeout=300)[0]
        assert run.returncode == 0, out
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
    study = optuna.load_study(study_name=resolved["study"], storage=LOCAL_PG)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
