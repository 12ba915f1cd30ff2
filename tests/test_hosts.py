"""Hosts for real: a database host (PostgreSQL on its own address, and the storage proxy) and
two worker hosts, each a network namespace joined by a bridge of its own, with traffic only
among them. The workers reach the study through the proxy alone, as
``docker-compose.worker.yml`` has them do, and write their models to a folder every host
mounts (one file system here, a shared folder across machines).

Faults: a worker host cut off past the grace period and back (its trial rerun elsewhere, its
late result dropped), the database host cut off for 30 s (the workers ride it out), the proxy
restarted. Each study ends with exactly its budget. Two proxies on the one database, one on
each worker host for that host's commands: the budget exact, a killed worker's trial rerun
once, a grid that both hosts' ``reproduce`` enqueue at once enqueued once.

Needs root, ``ip`` (iproute2) and PostgreSQL's server binaries; skipped without them unless
``TAUOPT_REQUIRE_HOSTS=1`` (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import glob
import json
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

pytestmark = pytest.mark.hosts

SUBNET = "10.77.0"
DB_ADDRESS = f"{SUBNET}.1"
PROXY = f"grpc://{DB_ADDRESS}:13000"
DATABASE = f"postgresql://postgres@{DB_ADDRESS}:5432/tauopt"
HOSTS = {"db": 1, "w1": 2, "w2": 3}
# A small learning rate and time horizon: no trial may diverge. A diverged trial is its own
# failure and uses its budget, which these tests would misread as a fault's doing (the
# default ranges, lr up to 0.3 and T up to 10, diverge now and then).
CONFIG = """
[study]
min_val_accuracy = 0.0
[search]
arch = "resnet"
depth = 3
width = 32
lr = 0.05
T = [0.5, 2.0]
[trial]
epochs = {epochs}
train_size = 10000
val_size = 2000
[storage]
heartbeat_interval = {interval}
grace_period = {grace}
"""


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return Path(found[-1]).parent if found else None


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip is needed (apt-get install iproute2)"
    if _postgres_bin() is None:
        return "PostgreSQL's server binaries are needed (apt-get install postgresql)"
    probe = subprocess.run(["ip", "netns", "add", "tauopt-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a network namespace: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "tauopt-probe"], check=False)
    return None


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


class Network:
    """Three hosts on a bridge in a namespace of its own."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:4]
        self.switch = f"tauopt-sw-{tag}"
        self.ns = {host: f"tauopt-{host}-{tag}" for host in HOSTS}
        self.ports = {host: f"p{host}{tag}" for host in HOSTS}

    def up(self) -> None:
        _run("ip", "netns", "add", self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for host, last in HOSTS.items():
            ns, port, inside = self.ns[host], self.ports[host], f"h{host}{self.switch[-4:]}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", inside, "type", "veth", "peer", "name", port)
            _run("ip", "link", "set", inside, "netns", ns, "name", "eth0")
            _run("ip", "link", "set", port, "netns", self.switch)
            _run("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "addr", "add", f"{SUBNET}.{last}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")

    def cut(self, host: str, down: bool) -> None:
        _run("ip", "-n", self.switch, "link", "set", self.ports[host], "down" if down else "up")

    def down(self) -> None:
        for name in [*self.ns.values(), self.switch]:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)

    def argv(self, host: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host], *argv]


class Process:
    """A process on one host, its output collected as it comes."""

    def __init__(self, argv: list[str], cwd: Path | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Cluster:
    """The hosts, PostgreSQL and the proxy on the database host, a shared models folder."""

    def __init__(self, root: Path, data_dir: Path) -> None:
        self.root, self.data_dir = root, data_dir
        self.net = Network()
        self.artifacts = root / "artifacts"
        self.pgdata = root / "pgdata"
        self.postgres: Process | None = None
        self.proxy: Process | None = None
        self.host_proxies: dict[str, Process] = {}

    def start(self) -> None:
        self.net.up()
        self.artifacts.mkdir(mode=0o777)
        self.pgdata.mkdir()
        shutil.chown(self.pgdata, "postgres", "postgres")
        bin_dir = _postgres_bin()
        assert bin_dir is not None
        as_postgres = ["runuser", "-u", "postgres", "--"]
        _run(*as_postgres, str(bin_dir / "initdb"), "-D", str(self.pgdata), "-U", "postgres",
             "--auth=trust")  # fmt: skip
        with open(self.pgdata / "pg_hba.conf", "a") as hba:  # the hosts' own subnet
            hba.write(f"host all all {SUBNET}.0/24 trust\n")
        self.postgres = Process(self.net.argv(
            "db", *as_postgres, str(bin_dir / "postgres"), "-D", str(self.pgdata),
            "-c", f"listen_addresses={DB_ADDRESS}", "-c", f"unix_socket_directories={self.pgdata}",
        ))  # fmt: skip
        self._wait(lambda: self.sql("SELECT 1", database="postgres") == "1", "PostgreSQL")
        self.sql("CREATE DATABASE tauopt", database="postgres")
        self.start_proxy()

    def sql(self, query: str, database: str = "tauopt") -> str:
        done = subprocess.run(
            self.net.argv("db", "runuser", "-u", "postgres", "--", "psql", "-h", DB_ADDRESS,
                          "-d", database, "-tAc", query),
            capture_output=True, text=True,
        )  # fmt: skip
        return done.stdout.strip()

    def start_proxy(self) -> None:
        self.proxy = Process(self.net.argv(
            "db", sys.executable, "-m", "tauopt", "proxy", "--storage", DATABASE,
            "--host", DB_ADDRESS,
        ))  # fmt: skip
        self._wait(lambda: "listening on" in self.proxy_output(), "the proxy")

    def start_host_proxy(self, host: str) -> str:
        """A proxy of ``host``'s own, on its address, serving the same database as the
        database host's; returns its address."""
        address = f"{SUBNET}.{HOSTS[host]}"
        proxy = self.host_proxies[host] = Process(self.net.argv(
            host, sys.executable, "-m", "tauopt", "proxy", "--storage", DATABASE,
            "--host", address,
        ))  # fmt: skip
        self._wait(lambda: "listening on" in proxy.output, f"the proxy on {host}")
        return f"grpc://{address}:13000"

    def proxy_output(self) -> str:
        return self.proxy.output if self.proxy else ""

    def _wait(self, ready: object, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():  # type: ignore[operator]
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not come up")
            time.sleep(0.3)

    def tauopt(self, host: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.net.argv(host, sys.executable, "-m", "tauopt", *args),
            capture_output=True, text=True, timeout=300, cwd=self.root,
        )  # fmt: skip

    def started(self, host: str, *args: str) -> Process:
        """``tauopt ARGS`` on ``host``, left running."""
        return Process(self.net.argv(host, sys.executable, "-m", "tauopt", *args), cwd=self.root)

    def worker(self, host: str, study: str, proxy: str = PROXY) -> Process:
        return Process(self.net.argv(
            host, sys.executable, "-m", "tauopt", "worker", "--storage", proxy, "--study", study,
            "--data-dir", str(self.data_dir), "--artifact-dir", str(self.artifacts),
            "--device", "cpu", "--threads", "1",
        ))  # fmt: skip

    def create(
        self, study: str, n: int, *, epochs: int, interval: int, grace: int, proxy: str = PROXY
    ) -> None:
        config = self.root / f"{study}.toml"
        config.write_text(CONFIG.format(epochs=epochs, interval=interval, grace=grace))
        done = self.tauopt("w1", "create", "--storage", proxy, "--study", study, "--config",
                           str(config), "--n-trials", str(n))  # fmt: skip
        assert done.returncode == 0, done.stderr

    def states(self, study: str) -> dict[str, int]:
        rows = self.sql(
            "SELECT t.state, COUNT(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
            f"WHERE s.study_name = '{study}' GROUP BY t.state"
        )
        return {state: int(n) for state, n in (row.split("|") for row in rows.splitlines())}

    def assert_exact(self, study: str, n: int, outputs: list[str] | None = None) -> None:
        """Exactly ``n`` COMPLETE, nothing left running or waiting, and no failure booked
        against the budget (a trial failed by a fault was queued again and rerun)."""
        states = self.states(study)
        booked = self.sql(
            "SELECT a.value_json FROM trial_user_attributes a JOIN trials t ON t.trial_id = "
            "a.trial_id JOIN studies s ON s.study_id = t.study_id WHERE "
            f"s.study_name = '{study}' AND a.key = 'fail_reason'"
        )
        exact = states.get("COMPLETE") == n and not {"RUNNING", "WAITING"} & set(states)
        assert exact and not booked, (states, booked, *(outputs or []))

    def running_of(self, worker: Process, study: str, timeout: float = 180) -> None:
        """Wait until ``worker`` (by its pid: the hosts share a host name here) runs a trial."""
        pid = worker.proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.sql(
                "SELECT a.value_json FROM trial_user_attributes a JOIN trials t ON "
                "t.trial_id = a.trial_id JOIN studies s ON s.study_id = t.study_id WHERE "
                f"s.study_name = '{study}' AND t.state = 'RUNNING' AND a.key = 'worker'"
            )
            # `ip netns exec` runs the worker as a child: its pid is the worker's parent's
            if any(json.loads(r).split(":")[-1] in _children(pid) for r in rows.splitlines()):
                return
            time.sleep(0.3)
        pytest.fail(f"the worker never ran a trial:\n{worker.output}")

    def running_numbers(self, study: str) -> list[int]:
        rows = self.sql(
            "SELECT t.number FROM trials t JOIN studies s ON s.study_id = t.study_id "
            f"WHERE s.study_name = '{study}' AND t.state = 'RUNNING'"
        )
        return [int(row) for row in rows.splitlines()]

    def stop(self) -> None:
        for process in (*self.host_proxies.values(), self.proxy, self.postgres):
            if process is not None:
                process.stop()
        self.net.down()


def _children(pid: int) -> set[str]:
    """``pid`` and its descendants, as strings."""
    out, todo = {str(pid)}, [pid]
    while todo:
        found = subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True, text=True)
        for child in found.stdout.split():
            out.add(child)
            todo.append(int(child))
    return out


@pytest.fixture(scope="module")
def cluster(data_dir: Path) -> Iterator[Cluster]:
    why = _unavailable()
    if why is not None:
        if os.environ.get("TAUOPT_REQUIRE_HOSTS") == "1":
            pytest.fail(f"TAUOPT_REQUIRE_HOSTS=1 but {why}")
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="tauopt-hosts-"))
    os.chmod(root, 0o755)
    hosts = Cluster(root, data_dir)
    try:
        hosts.start()
        yield hosts
    finally:
        hosts.stop()
        shutil.rmtree(root, ignore_errors=True)


def _finish(workers: list[Process], timeout: float = 600) -> None:
    for worker in workers:
        worker.proc.wait(timeout=timeout)
    outputs = "\n---\n".join(w.output for w in workers)
    assert [w.proc.returncode for w in workers] == [0] * len(workers), outputs
    assert "Traceback" not in outputs, outputs


def test_a_worker_host_cut_off_past_the_grace_period_comes_back(cluster: Cluster) -> None:
    study = f"cut-{uuid.uuid4().hex[:6]}"
    # 40 epochs (about 2 s): the cut must land while w1 trains, not after its trial ended
    cluster.create(study, 6, epochs=40, interval=1, grace=6)
    w1 = cluster.worker("w1", study)
    cluster.running_of(w1, study)
    cluster.net.cut("w1", down=True)
    w2 = cluster.worker("w2", study)
    deadline = time.monotonic() + 120
    while "heartbeat went silent" not in w2.output and time.monotonic() < deadline:
        time.sleep(0.5)
    cluster.net.cut("w1", down=False)
    _finish([w1, w2])
    assert "heartbeat went silent" in w2.output, w2.output  # w1's trial, rerun on w2
    assert "result is dropped" in w1.output, w1.output  # w1's late result
    cluster.assert_exact(study, 6)
    # every host's models are in the shared folder, where the dashboard host reads them
    best = cluster.tauopt("db", "best", "--storage", PROXY, "--study", study, "--json",
                          "--artifact-dir", str(cluster.artifacts))  # fmt: skip
    assert best.returncode == 0 and json.loads(best.stdout), best.stderr


def test_the_workers_ride_out_a_database_host_cut_off_for_30_s(cluster: Cluster) -> None:
    study = f"db-{uuid.uuid4().hex[:6]}"
    # 30 epochs (about 2 s), so that the cut lands while trials run (see the proxy's test)
    cluster.create(study, 6, epochs=30, interval=5, grace=60)
    workers = [cluster.worker("w1", study), cluster.worker("w2", study)]
    cluster.running_of(workers[0], study)
    cluster.net.cut("db", down=True)
    time.sleep(30)
    cluster.net.cut("db", down=False)
    _finish(workers)
    cluster.assert_exact(study, 6)


def test_the_workers_ride_out_a_restarted_proxy(cluster: Cluster) -> None:
    study = f"proxy-{uuid.uuid4().hex[:6]}"
    # 30 epochs (about 2 s): w2's trials of 3 epochs (0.2 s each) all ended between two looks
    # at the database once, and the restart never came
    cluster.create(study, 6, epochs=30, interval=2, grace=30)
    workers = [cluster.worker("w1", study), cluster.worker("w2", study)]
    cluster.running_of(workers[1], study)
    assert cluster.proxy is not None
    cluster.proxy.stop()
    time.sleep(5)
    cluster.start_proxy()
    _finish(workers)
    cluster.assert_exact(study, 6, outputs=[w.output for w in workers])


def test_two_proxies_on_one_database_one_per_worker_host(cluster: Cluster) -> None:
    """Each worker host runs a proxy of its own on the database, and its commands go through
    it: the two proxies' caches and their services share nothing but the database."""
    proxies = {host: cluster.start_host_proxy(host) for host in ("w1", "w2")}
    # the grid from both hosts at once, each through its own proxy
    grid = f"grid-{uuid.uuid4().hex[:6]}"
    tiny = ("--study", grid, "--epochs", "1", "--train-size", "100")
    racing = [
        cluster.started(host, "reproduce", "--storage", url, *tiny) for host, url in proxies.items()
    ]
    for process in racing:
        process.proc.wait(timeout=300)
    assert [p.proc.returncode for p in racing] == [0, 0], [p.output for p in racing]
    rows = cluster.sql(
        "SELECT t.state, a.value_json, (SELECT COUNT(*) FROM trial_user_attributes d WHERE "
        "d.trial_id = t.trial_id AND d.key = 'duplicate_of') FROM trials t JOIN studies s ON "
        "s.study_id = t.study_id JOIN trial_user_attributes a ON a.trial_id = t.trial_id WHERE "
        f"s.study_name = '{grid}' AND a.key = 'grid_id'"
    )
    trials = [row.split("|") for row in rows.splitlines()]
    waiting = [run for state, run, _ in trials if state == "WAITING"]
    assert len(waiting) == len(set(waiting)) == 76, trials
    assert all(state == "FAIL" and copy == "1" for state, _, copy in trials if state != "WAITING")

    # a worker killed under its trial, and one worker on each host through its own proxy
    study = f"two-{uuid.uuid4().hex[:6]}"
    cluster.create(study, 6, epochs=40, interval=1, grace=10, proxy=proxies["w1"])
    doomed = cluster.worker("w1", study, proxies["w1"])
    cluster.running_of(doomed, study)
    killed = cluster.running_numbers(study)
    for pid in _children(doomed.proc.pid):
        subprocess.run(["kill", "-KILL", pid], check=False)
    doomed.proc.wait(timeout=30)
    workers = [cluster.worker(host, study, url) for host, url in proxies.items()]
    _finish(workers)
    outputs = [w.output for w in workers]
    cluster.assert_exact(study, 6, outputs)
    assert killed and "failed and queued again" in "".join(outputs), outputs
    for number in killed:  # failed once, and run again to the end once
        # Its reruns all name it (a rerun of a rerun too): one completed; any other was
        # itself failed as dead (a heartbeat late past the grace period on a loaded machine)
        # and queued again, never run twice to the end.
        reruns = cluster.sql(
            "SELECT t.state FROM trial_system_attributes a JOIN trials t ON t.trial_id = "
            "a.trial_id JOIN studies s ON s.study_id = t.study_id WHERE "
            f"s.study_name = '{study}' AND a.key = 'failed_trial' AND a.value_json = '{number}'"
        ).splitlines()
        state = cluster.sql(
            "SELECT t.state FROM trials t JOIN studies s ON s.study_id = t.study_id WHERE "
            f"s.study_name = '{study}' AND t.number = {number}"
        )
        once = reruns.count("COMPLETE") == 1 and set(reruns) <= {"COMPLETE", "FAIL"}
        assert state == "FAIL" and once, (number, state, reruns, *outputs)
    for host, proxy in cluster.host_proxies.items():
        assert "Traceback" not in proxy.output, (host, proxy.output)
