"""``docker compose up`` for real: the image built from the project's Dockerfile, and
docker-compose.yml brought up by Debian's docker-compose against podman's Docker-compatible
API. Only the base images are stand-ins (``tests/compose/stand_ins.sh``), and
``tests/compose/docker-compose.test.yml`` adds a small study config and this machine's
datasets. Everything is checked from the host: the database through ``psql`` in the ``db``
container, the dashboard on 127.0.0.1:8080, the models in the artifacts volume.

The tests run in order and share one deployment (one compose project, removed at the end).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parent.parent
HERE = REPO / "tests" / "compose"
STUDY = "compose-test"
DB_USER, DB_NAME = "tauopt", "tauopt"
# The trials must run for a few seconds each, so that `stop` finds one running.
STUDY_TOML = """[study]
n_trials = {n}
[search]
arch = "resnet"
[trial]
epochs = 3
train_size = 50000
val_size = 2000
"""
FIGURES = REPO / "build" / "compose_figures.json"


def _run(args: list[str], *, timeout: float, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args[:4])} ... exit {done.returncode}:\n{done.stderr}")
    return done.stdout


def _skip(reason: str) -> None:
    """Skip, except where the suite must run (CI sets TAUOPT_REQUIRE_COMPOSE=1)."""
    if os.environ.get("TAUOPT_REQUIRE_COMPOSE") == "1":
        pytest.fail(f"the compose suite must run here (TAUOPT_REQUIRE_COMPOSE=1), but {reason}")
    pytest.skip(reason)


def _why_not() -> str | None:
    """Why this machine cannot run the suite, or None."""
    missing = [b for b in ("podman", "docker-compose", "debootstrap") if not shutil.which(b)]
    if missing:
        return f"{', '.join(missing)} not installed (.ci/run installs them)"
    if os.geteuid() != 0:
        return "needs root: rootful podman (rootless needs subordinate ids set up)"
    return None


@dataclass
class Deployment:
    """The compose project of this module and the podman service that runs it."""

    project: str
    env: dict[str, str]
    env_file: Path
    config_dir: Path
    figures: dict[str, float] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 300) -> str:
        files = [
            "-f",
            str(REPO / "docker-compose.yml"),
            "-f",
            str(HERE / "docker-compose.test.yml"),
        ]
        cmd = ["docker-compose", "-p", self.project, "--project-directory", str(REPO), *files]
        try:
            return _run(
                [*cmd, "--env-file", str(self.env_file), *args], timeout=timeout, env=self.env
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.failed_logs()}") from None

    def failed_logs(self) -> str:
        """The logs of this project's containers that exited with an error: compose names
        only the container, and its own words say why."""
        out = self.podman("ps", "-a", "--filter", f"name={self.project}_", "--format",
                          "{{.Names}} {{.Status}}")  # fmt: skip
        failed = [line.split(" ", 1)[0] for line in out.splitlines() if "Exited (0)" not in line
                  and "Exited" in line]  # fmt: skip
        return "\n".join(f"--- {name}:\n{self.logs(name)[-3000:]}" for name in failed)

    def podman(self, *args: str, timeout: float = 60) -> str:
        return _run(["podman", *args], timeout=timeout, env=self.env)

    def logs(self, container: str) -> str:
        done = subprocess.run(["podman", "logs", container], capture_output=True, text=True,
                              timeout=60, env=self.env)  # fmt: skip
        return done.stdout + done.stderr  # the workers write to stderr

    def sql(self, query: str) -> list[list[str]]:
        out = self.podman(
            "exec", f"{self.project}_db_1", "psql", "-U", DB_USER, "-d", DB_NAME, "-At", "-c", query
        )
        return [line.split("|") for line in out.splitlines() if line]

    def states(self) -> dict[str, int]:
        rows = self.sql(
            "SELECT t.state, count(*) FROM trials t JOIN studies s USING (study_id) "
            f"WHERE s.study_name = '{STUDY}' GROUP BY t.state"
        )
        return {state: int(n) for state, n in rows}

    def set_budget(self, n: int) -> None:
        (self.config_dir / "study.toml").write_text(STUDY_TOML.format(n=n))

    def workers(self) -> list[tuple[str, str]]:
        """(name, status) of this project's worker containers."""
        out = self.podman(
            "ps",
            "-a",
            "--filter",
            f"name={self.project}_worker_",
            "--format",
            "{{.Names}} {{.Status}}",
        )
        return [tuple(line.split(" ", 1)) for line in out.splitlines()]  # type: ignore[misc]

    def wait_for_workers(self, timeout: float = 600) -> None:
        """Until every worker has exited; each must have exited 0."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            workers = self.workers()
            if workers and all(status.startswith("Exited") for _, status in workers):
                assert all(status.startswith("Exited (0)") for _, status in workers), workers
                return
            time.sleep(1)
        raise AssertionError(f"workers still running after {timeout}s: {self.workers()}")

    def artifact_dir(self) -> Path:
        out = self.podman(
            "volume", "inspect", f"{self.project}_artifacts", "--format", "{{.Mountpoint}}"
        )
        return Path(out.strip())

    def artifact_ids(self) -> list[str]:
        rows = self.sql(
            "SELECT a.value_json FROM trial_user_attributes a JOIN trials t USING (trial_id) "
            f"JOIN studies s USING (study_id) WHERE s.study_name = '{STUDY}' "
            "AND a.key = 'model_artifact_id' ORDER BY t.number"
        )
        return [json.loads(row[0]) for row in rows]


def _health_checks(dep: Deployment, stop: threading.Event) -> None:
    """Run the containers' health checks. Docker's engine schedules them itself; podman leaves
    that to systemd timers, and this machine has no systemd, so without this loop `db` would
    stay 'starting' and nothing would wait on it."""
    while not stop.wait(2):
        try:
            ids = dep.podman("ps", "--filter", "health=starting", "--format", "{{.ID}}").split()
            for container in ids:
                subprocess.run(["podman", "healthcheck", "run", container], env=dep.env,
                               capture_output=True, timeout=30)  # fmt: skip
        except (AssertionError, subprocess.TimeoutExpired):
            continue


def _build_image(env: dict[str, str]) -> float:
    """Build tauopt:cpu from the Dockerfile; torch from a local wheelhouse where there is one."""
    wheelhouse = Path(os.environ.get("TAUOPT_WHEELHOUSE", "/opt/wheels"))
    args = ["podman", "build", "-q", "-t", "tauopt:cpu"]
    if list(wheelhouse.glob("torch-*.whl")):
        args += ["--build-arg", "TORCH_FIND_LINKS=/wheels", "-v", f"{wheelhouse}:/wheels:ro"]
    start = time.monotonic()
    _run([*args, str(REPO)], timeout=1500, env=env)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[Deployment]:
    reason = _why_not()
    if reason:
        _skip(reason)
    tmp = tmp_path_factory.mktemp("compose")
    env = {**os.environ, "CONTAINERS_CONF": str(HERE / "containers.conf")}
    _run(["bash", str(HERE / "stand_ins.sh")], timeout=1200, env=env)
    probe = subprocess.run(["podman", "run", "--rm", "python:3.11-slim", "true"], env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    if probe.returncode != 0:
        _skip(f"podman cannot run containers here: {probe.stderr.strip()[-300:]}")
    socket = tmp / "podman.sock"
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    project = f"tauopt_ct_{uuid.uuid4().hex[:6]}"
    (tmp / "config").mkdir()
    env_file = tmp / "compose.env"
    # A password with URL characters: it reaches the workers through libpq's PGPASSWORD.
    env_file.write_text(
        f"POSTGRES_USER={DB_USER}\nPOSTGRES_PASSWORD=p@ss:w/rd?#%\nPOSTGRES_DB={DB_NAME}\n"
        f"TAUOPT_STUDY={STUDY}\nTAUOPT_TEST_CONFIG_DIR={tmp / 'config'}\n"
        f"TAUOPT_TEST_DATA={data_dir}\n"
    )
    compose_env = {**env, "DOCKER_HOST": f"unix://{socket}"}
    compose_env = {
        k: v for k, v in compose_env.items() if not k.startswith(("POSTGRES_", "TAUOPT_"))
    }
    dep = Deployment(project, compose_env, env_file, tmp / "config")
    stop = threading.Event()
    checker = threading.Thread(target=_health_checks, args=(dep, stop), daemon=True)
    try:
        for _ in range(100):
            if socket.exists():
                break
            time.sleep(0.1)
        dep.figures["build_seconds"] = _build_image(env)
        size = dep.podman("image", "inspect", "tauopt:cpu", "--format", "{{.Size}}")
        dep.figures["image_bytes"] = float(size.strip())
        checker.start()
        yield dep
    finally:
        stop.set()
        try:
            dep.compose("down", "-v", "--remove-orphans", timeout=300)
        finally:
            service.terminate()
            service.wait(timeout=30)
            # Each build leaves the previous tauopt:cpu untagged (about 1.5 GB apiece).
            subprocess.run(["podman", "image", "prune", "-f"], env=env, capture_output=True,
                           timeout=300)  # fmt: skip
        FIGURES.parent.mkdir(exist_ok=True)
        FIGURES.write_text(json.dumps(dep.figures, indent=2) + "\n")


N_FIRST = 6


def test_up_runs_the_study_to_exactly_its_budget(deployment: Deployment) -> None:
    dep = deployment
    dep.set_budget(N_FIRST)
    start = time.time()
    dep.compose("up", "-d", "--scale", "worker=2", "db", "create", "data", "worker", "dashboard")
    dep.wait_for_workers()
    first = dep.sql(
        "SELECT min(extract(epoch FROM datetime_complete)) FROM trials WHERE state = 'COMPLETE'"
    )
    dep.figures["up_to_first_trial_seconds"] = float(first[0][0]) - start
    assert dep.states() == {"COMPLETE": N_FIRST}
    # Both workers took part.
    logs = [dep.logs(name) for name, _ in dep.workers()]
    assert len(logs) == 2 and all("complete [" in log for log in logs), logs


def test_the_dashboard_lists_the_study(deployment: Deployment) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen("http://127.0.0.1:8080/api/studies", timeout=10) as r:
                studies = json.load(r)["study_summaries"]
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    assert [s["study_name"] for s in studies] == [STUDY]


def test_every_trained_model_is_in_the_artifacts_volume(deployment: Deployment) -> None:
    ids = deployment.artifact_ids()
    assert len(ids) == N_FIRST
    folder = deployment.artifact_dir()
    for artifact in ids:
        assert (folder / artifact).stat().st_size > 10_000  # a whole network's weights


def test_down_then_up_keeps_the_study_trials_and_models(deployment: Deployment) -> None:
    dep = deployment
    before_ids = dep.artifact_ids()
    dep.compose("down")
    dep.compose("up", "-d", "--scale", "worker=2", "db", "create", "data", "worker", "dashboard")
    dep.wait_for_workers()
    assert dep.states() == {"COMPLETE": N_FIRST}  # the budget is spent: nothing new ran
    assert dep.artifact_ids() == before_ids
    assert all((dep.artifact_dir() / a).is_file() for a in before_ids)
    db_log = dep.logs(f"{dep.project}_db_1")
    assert "initialised" not in db_log  # the stand-in kept its data: no second initdb


def test_a_raised_budget_runs_only_the_new_trials(deployment: Deployment) -> None:
    dep = deployment
    dep.set_budget(N_FIRST + 2)
    dep.compose("up", "-d", "--scale", "worker=2", "worker")  # create runs again first
    dep.wait_for_workers()
    assert dep.states() == {"COMPLETE": N_FIRST + 2}
    assert len(set(dep.artifact_ids())) == N_FIRST + 2


def test_stop_with_a_trial_running_then_up_ends_with_the_exact_budget(
    deployment: Deployment,
) -> None:
    dep = deployment
    budget = N_FIRST + 6
    dep.set_budget(budget)
    dep.compose("up", "-d", "--scale", "worker=2", "worker")
    deadline = time.monotonic() + 300
    while dep.states().get("RUNNING", 0) == 0:
        assert time.monotonic() < deadline, "no trial started"
        time.sleep(0.2)
    dep.compose("stop", "worker")
    states = dep.states()
    assert states.get("RUNNING", 0) == 0  # the stopped workers handed their trials back
    requeued = dep.sql(
        "SELECT count(*) FROM trial_user_attributes a JOIN trials t USING (trial_id) "
        "WHERE t.state = 'FAIL' AND a.key = 'retry_reason' "
        "AND a.value_json LIKE '%stopped by SIGTERM%'"
    )
    assert int(requeued[0][0]) >= 1
    dep.compose("up", "-d", "--scale", "worker=2", "worker")
    dep.wait_for_workers()
    states = dep.states()
    assert states["COMPLETE"] == budget and set(states) <= {"COMPLETE", "FAIL"}
    # Every failure is a requeued interruption, not a lost trial.
    assert states.get("FAIL", 0) == int(requeued[0][0])
