"""Database faults behind the proxy, as on a direct database: PostgreSQL stopped for 20 s,
restarted three times in a row, out of connections for the proxy's role, its database
dropped. Each study ends with exactly its budget and every worker exits 0 (the dropped
database: they stop with one line naming the cause), and the proxy logs what failed.

The faults stop and start a PostgreSQL cluster of the test's own (``initdb`` in a temporary
folder, on a free port), never the machine's shared server. Needs root (the server runs as
the ``postgres`` user) and PostgreSQL's server binaries; skipped without them unless
``TAUOPT_REQUIRE_HOSTS=1`` (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from conftest import free_port
from test_faults import CONFIG, Worker

pytestmark = pytest.mark.postgres


def _bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class Cluster:
    """A PostgreSQL server of this test module's own, on 127.0.0.1 and a free port."""

    def __init__(self, root: Path, bin_dir: Path) -> None:
        self.bin, self.data, self.port = bin_dir, root / "pgdata", free_port()
        self.log = root / "postgres.log"
        self.admin = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, timeout=120
        )

    def init(self) -> None:
        self.data.mkdir()
        shutil.chown(self.data, "postgres", "postgres")
        shutil.chown(self.data.parent, "postgres", "postgres")
        self._as_postgres(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust"
        )
        self.start()

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.data} -c max_connections=100"
        )
        pg_ctl = str(self.bin / "pg_ctl")
        self._as_postgres(pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", options,
                          "-w", "start")  # fmt: skip

    def stop(self) -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                          "stop")  # fmt: skip

    def sql(self, statement: str) -> None:
        engine = sqlalchemy.create_engine(self.admin, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(statement))
        engine.dispose()

    def database(self, role: str = "postgres") -> str:
        name = f"tauopt_{uuid.uuid4().hex[:8]}"
        self.sql(f'CREATE DATABASE "{name}" OWNER {role}')
        return f"postgresql+psycopg2://{role}@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    bin_dir = _bin()
    why = (
        "a private PostgreSQL runs as the postgres user: needs root"
        if os.geteuid() != 0
        else None
        if bin_dir is not None
        else "PostgreSQL's server binaries are needed (apt-get install postgresql)"
    )
    if why is not None:
        if os.environ.get("TAUOPT_REQUIRE_HOSTS") == "1":
            pytest.fail(f"TAUOPT_REQUIRE_HOSTS=1 but {why}")
        pytest.skip(why)
    assert bin_dir is not None
    root = Path(tempfile.mkdtemp(prefix="tauopt-pg-"))
    served = Cluster(root, bin_dir)
    try:
        served.init()
        yield served
    finally:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(bin_dir / "pg_ctl"), "-D",
             str(served.data), "-m", "immediate", "stop"],
            capture_output=True, check=False,
        )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


class Proxy:
    """``tauopt proxy`` in front of one database, its output collected as it comes."""

    def __init__(self, database: str, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"grpc://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "tauopt", "proxy", "--storage", database]
        self.proc = subprocess.Popen(
            [*argv, "--port", str(self.port), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 60
        while "listening on" not in self.output:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                pytest.fail(f"the proxy did not come up:\n{self.output}")
            time.sleep(0.1)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _create(storage: str, tmp_path: Path, n: int, *, epochs: int, interval: int, grace: int) -> str:
    name = f"pf-{uuid.uuid4().hex[:8]}"
    config = tmp_path / f"{name}.toml"
    text = CONFIG.format(epochs=epochs, train_size=10000)
    text = text.replace("heartbeat_interval = 1", f"heartbeat_interval = {interval}")
    config.write_text(text.replace("grace_period = 4", f"grace_period = {grace}"))
    done = subprocess.run(
        [sys.executable, "-m", "tauopt", "create", "--storage", storage, "--study", name,
         "--config", str(config), "--n-trials", str(n)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return name


def _states(database: str, study: str) -> dict[str, int]:
    # as the superuser: a limited role's connections are the proxy's
    engine = sqlalchemy.create_engine(sqlalchemy.engine.make_url(database).set(username="postgres"))
    with engine.connect() as conn:
        rows = conn.execute(
            sqlalchemy.text(
                "SELECT t.state, COUNT(*) FROM trials t JOIN studies s ON s.study_id = "
                "t.study_id WHERE s.study_name = :s GROUP BY t.state"
            ),
            {"s": study},
        )
        out = {str(state): int(n) for state, n in rows}
        booked = conn.execute(
            sqlalchemy.text("SELECT COUNT(*) FROM trial_user_attributes WHERE key = 'fail_reason'")
        ).scalar()
    engine.dispose()
    assert not booked, "a fault was booked against a trial's budget"
    return out


def _running(database: str, study: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _states(database, study).get("RUNNING"):
            return
        time.sleep(0.3)
    pytest.fail("no trial started")


def _past_first_contact(workers: list[Worker]) -> None:
    """Every worker trains: a database that never answered a worker is a wrong address to it
    ("connection refused" then is lasting), not a restart."""
    for worker in workers:
        worker.wait_for("epoch 1/", timeout=180)


def _exact(database: str, study: str, n: int, workers: list[Worker]) -> None:
    codes = []
    for w in workers:
        try:
            codes.append(w.finish(timeout=600))
        except subprocess.TimeoutExpired:
            for other in workers:
                other.abort()
            pytest.fail("a worker hung:\n" + "\n---\n".join(o.output for o in workers))
    outputs = "\n---\n".join(w.output for w in workers)
    assert codes == [0] * len(workers), outputs
    assert "Traceback" not in outputs, outputs
    states = _states(database, study)
    assert states.get("COMPLETE") == n and not {"RUNNING", "WAITING"} & set(states), (
        states,
        outputs,
    )


def _workers(storage: str, study: str, tmp_path: Path, data_dir: Path, k: int) -> list[Worker]:
    return [Worker(storage, study, tmp_path / "artifacts", data_dir, s) for s in range(1, k + 1)]


@pytest.fixture(params=["direct", "proxy"])
def path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _storage(cluster: Cluster, path: str, *extra: str) -> tuple[str, str, Proxy | None]:
    """(the database's URL, what the workers use, the proxy or None)."""
    database = cluster.database()
    if path == "direct":
        return database, database, None
    proxy = Proxy(database, *extra)
    return database, proxy.url, proxy


def test_workers_ride_out_postgresql_stopped_for_20_s(
    cluster: Cluster, path: str, tmp_path: Path, data_dir: Path
) -> None:
    database, storage, proxy = _storage(cluster, path)
    try:
        # 20 epochs (several seconds): the stop lands while trials run; a grace period past
        # the outage, so that no trial is thought dead for the database's silence
        study = _create(storage, tmp_path, 6, epochs=20, interval=5, grace=60)
        workers = _workers(storage, study, tmp_path, data_dir, 2)
        _past_first_contact(workers)
        cluster.stop()
        time.sleep(20)
        cluster.start()
        _exact(database, study, 6, workers)
        assert any("retrying" in w.output for w in workers)
        if proxy is not None:
            assert "database error in" in proxy.output and "answered UNAVAILABLE" in proxy.output
            assert "the database answers again" in proxy.output, proxy.output
    finally:
        if proxy is not None:
            proxy.stop()


def test_workers_ride_out_three_short_restarts(
    cluster: Cluster, path: str, tmp_path: Path, data_dir: Path
) -> None:
    database, storage, proxy = _storage(cluster, path)
    try:
        # 10 trials of 30 epochs (5-7 s each here): with 20 epochs and 8 trials the study
        # once ended before the third restart
        study = _create(storage, tmp_path, 10, epochs=30, interval=2, grace=30)
        workers = _workers(storage, study, tmp_path, data_dir, 2)
        _past_first_contact(workers)
        for _ in range(3):
            cluster.stop()
            time.sleep(0.2)
            cluster.start()
            time.sleep(2)
        assert _states(database, study).get("COMPLETE", 0) < 10, "make the trials longer"
        _exact(database, study, 10, workers)
    finally:
        if proxy is not None:
            proxy.stop()


def test_workers_ride_out_connections_terminated_repeatedly(
    cluster: Cluster, path: str, tmp_path: Path, data_dir: Path
) -> None:
    """Every client connection of the study's database terminated, 60 rounds 0.2 s apart,
    under two training workers (the proxy's own connections, behind the proxy)."""
    database, storage, proxy = _storage(cluster, path)
    try:
        study = _create(storage, tmp_path, 6, epochs=20, interval=2, grace=30)
        workers = _workers(storage, study, tmp_path, data_dir, 2)
        _past_first_contact(workers)
        name = database.rsplit("/", 1)[1]
        engine = sqlalchemy.create_engine(cluster.admin, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            for _ in range(60):
                conn.execute(
                    sqlalchemy.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname "
                        "= :db AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
                    ),
                    {"db": name},
                )
                time.sleep(0.2)
        engine.dispose()
        _exact(database, study, 6, workers)
    finally:
        if proxy is not None:
            proxy.stop()


def test_a_proxy_with_more_connections_than_its_role_may_open_keeps_its_workers(
    cluster: Cluster, tmp_path: Path, data_dir: Path
) -> None:
    """The role may hold 3 connections, the proxy is told 6. While another client holds all
    three (the server closed the proxy's own first), the proxy's calls find no connection:
    they are answered UNAVAILABLE and retried, and the proxy says why; once the connections
    are free, the study ends with its budget."""
    role = f"limited_{uuid.uuid4().hex[:6]}"
    cluster.sql(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 3")
    database = cluster.database(role)
    proxy = Proxy(database, "--db-connections", "6")
    other = sqlalchemy.create_engine(database, poolclass=sqlalchemy.pool.NullPool)
    held: list[sqlalchemy.Connection] = []
    try:
        study = _create(proxy.url, tmp_path, 12, epochs=2, interval=2, grace=30)
        cluster.sql(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
        )
        deadline = time.monotonic() + 30
        while len(held) < 3:  # the closed ones leave the role's count in a moment
            try:
                held.append(other.connect())
            except sqlalchemy.exc.OperationalError:
                assert time.monotonic() < deadline, "the role's connections were not freed"
                time.sleep(0.2)
        workers = _workers(proxy.url, study, tmp_path, data_dir, 4)
        deadline = time.monotonic() + 120
        while "too many connections for role" not in proxy.output:
            assert time.monotonic() < deadline, proxy.output
            time.sleep(0.5)
        for conn in held:
            conn.close()
        held = []
        _exact(database, study, 12, workers)
    finally:
        for conn in held:
            conn.close()
        other.dispose()
        proxy.stop()


def test_a_proxy_bounded_to_its_roles_connections_never_fails_a_call(
    cluster: Cluster, tmp_path: Path, data_dir: Path
) -> None:
    """--db-connections N on a role that may open N + 1 (one more while the proxy starts: the
    schema's lock): no call ever meets a full role."""
    role = f"limited_{uuid.uuid4().hex[:6]}"
    cluster.sql(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 3")
    database = cluster.database(role)
    proxy = Proxy(database, "--db-connections", "2")
    try:
        study = _create(proxy.url, tmp_path, 12, epochs=2, interval=2, grace=30)
        workers = _workers(proxy.url, study, tmp_path, data_dir, 4)
        _exact(database, study, 12, workers)
        assert "database error" not in proxy.output, proxy.output
        assert not any("retrying" in w.output for w in workers)
    finally:
        proxy.stop()


def test_a_dropped_database_behind_the_proxy_stops_the_workers_with_the_cause(
    cluster: Cluster, tmp_path: Path, data_dir: Path
) -> None:
    database = cluster.database()
    proxy = Proxy(database)
    try:
        study = _create(proxy.url, tmp_path, 20, epochs=3, interval=2, grace=30)
        workers = _workers(proxy.url, study, tmp_path, data_dir, 2)
        _running(database, study)
        name = database.rsplit("/", 1)[1]
        cluster.sql(f'DROP DATABASE "{name}" WITH (FORCE)')
        for worker in workers:
            assert worker.finish(timeout=120) == 2, worker.output
            last = worker.output.strip().splitlines()[-1]
            assert last.startswith("tauopt worker: error:") and "does not exist" in last, last
            assert "Traceback" not in worker.output
        assert "answered INTERNAL" in proxy.output, proxy.output
    finally:
        proxy.stop()
