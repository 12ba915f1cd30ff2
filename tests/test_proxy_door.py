"""Who may talk to the proxy, and every way of starting or reaching one wrongly, as one line:
the shared secret (refused without it, answered with it), a warning on a public address, one
proxy per port, a taken port, a host that does not resolve, IPv6 (``--host ::1``,
``grpc://[::1]:PORT``), an address that is no address, and nothing listening."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

SECRET = "tauopt-test-secret-0123456789"
TINY = "[study]\nmin_val_accuracy = 0.0\n[search]\ndepth = 2\nwidth = 8\n"
TINY += "[trial]\nepochs = 1\ntrain_size = 100\nval_size = 100\n"


def _tauopt(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "TAUOPT_PROXY_SECRET"}
    return subprocess.run(
        [sys.executable, "-m", "tauopt", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**environ, **(env or {})},
    )


def _one_line(done: subprocess.CompletedProcess[str], message: str) -> None:
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert message in lines[0] and "Traceback" not in done.stderr, done.stderr
    for source in ("add_port.cc", "chttp2_server.cc"):
        assert source not in done.stderr, done.stderr  # gRPC's own log lines stay out


class Proxy:
    def __init__(self, cwd: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        environ = {k: v for k, v in os.environ.items() if k != "TAUOPT_PROXY_SECRET"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tauopt", "proxy", "--port", str(self.port), *extra],
            cwd=cwd,
            stderr=subprocess.PIPE,
            text=True,
            env={**environ, **(env or {})},
        )
        assert self.proc.stderr is not None
        self.first = ""
        while "listening on" not in self.first:
            line = self.proc.stderr.readline()
            if not line:
                pytest.fail(f"the proxy did not start:\n{self.first}")
            self.first += line

    def stop(self) -> str:
        self.proc.terminate()
        return self.first + self.proc.communicate(timeout=30)[1]


@pytest.fixture()
def study(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "tiny.toml").write_text(TINY)
    done = _tauopt("create", "--config", "tiny.toml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    yield tmp_path


def test_a_proxy_with_a_secret_refuses_clients_without_it(study: Path, data_dir: Path) -> None:
    proxy = Proxy(study, env={"TAUOPT_PROXY_SECRET": SECRET})
    url = f"grpc://127.0.0.1:{proxy.port}"
    try:
        for env, why in (({}, "none is set here"), ({"TAUOPT_PROXY_SECRET": "x" * 20}, "differs")):
            for command in (["best"], ["export"], ["worker", "--data-dir", str(data_dir)]):
                done = _tauopt(*command, "--storage", url, cwd=study, env=env)
                _one_line(done, f"the proxy at {url} refused this client")
                assert why in done.stderr
        run = _tauopt(
            "worker", "--storage", url, "--data-dir", str(data_dir), "--device", "cpu", "--quiet",
            cwd=study, env={"TAUOPT_PROXY_SECRET": SECRET},
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        done = _tauopt("best", "--storage", url, cwd=study, env={"TAUOPT_PROXY_SECRET": SECRET})
        assert done.returncode == 0 and "Pareto-optimal trials" in done.stdout, done.stderr
    finally:
        log = proxy.stop()
    assert "shared secret required" in log
    assert "refused calls from ipv4:127.0.0.1: no shared secret, or a wrong one" in log
    assert log.count("refused calls from") == 1  # once a minute per address, not per call


def test_a_short_secret_is_one_line(study: Path) -> None:
    done = _tauopt("proxy", "--port", str(free_port()), cwd=study,
                   env={"TAUOPT_PROXY_SECRET": "short"})  # fmt: skip
    _one_line(done, "must be at least 16 printable characters")


@pytest.mark.parametrize(
    ("env", "warning"),
    [
        ({}, "anyone who reaches this port can read, change and delete every study"),
        ({"TAUOPT_PROXY_SECRET": SECRET}, "travel unencrypted"),
    ],
    ids=["open", "with-secret"],
)
def test_a_proxy_on_a_public_address_warns(study: Path, env: dict[str, str], warning: str) -> None:
    proxy = Proxy(study, "--host", "0.0.0.0", env=env)
    assert warning in proxy.stop()
    quiet = Proxy(study)  # the loopback default says nothing of the kind
    assert "warning" not in quiet.stop()


def test_one_proxy_per_port_and_bind_errors_are_one_line(study: Path) -> None:
    first = Proxy(study)
    try:
        second = _tauopt("proxy", "--port", str(first.port), cwd=study)
        _one_line(second, f"port {first.port} on 127.0.0.1 is in use")
    finally:
        first.stop()
    with socket.socket() as taken:  # any other program on the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _one_line(_tauopt("proxy", "--port", str(port), cwd=study), "is in use")
    _one_line(_tauopt("proxy", "--host", "no.such.host.invalid", cwd=study), "cannot be resolved")
    _one_line(_tauopt("proxy", "--port", "70000", cwd=study), "is not a port")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_a_proxy_on_ipv6_is_reached_with_its_brackets(study: Path) -> None:
    proxy = Proxy(study, "--host", "::1")
    try:
        assert f"grpc://[::1]:{proxy.port}" in proxy.first
        done = _tauopt("best", "--storage", f"grpc://[::1]:{proxy.port}", cwd=study)
        assert done.returncode == 0 and "'tauopt'" in done.stdout, done.stderr
    finally:
        proxy.stop()


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_a_proxy_on_localhost_owns_the_port_in_both_families(study: Path) -> None:
    # gRPC answers `localhost` with 127.0.0.1 and ::1 even where the system gives one: a proxy
    # on ::1 must keep a second on `localhost` out, and a proxy on `localhost` holds ::1.
    for first_host, second_host in (("::1", "localhost"), ("localhost", "::1")):
        first = Proxy(study, "--host", first_host)
        try:
            second = _tauopt(
                "proxy", "--host", second_host, "--port", str(first.port), cwd=study, timeout=60
            )  # a second proxy that starts serves until killed: fail in a minute, not five
            _one_line(second, f"port {first.port} on {second_host} is in use")
        finally:
            first.stop()


@pytest.mark.parametrize("url", ["grpc://[::1", "grpc://host:99999", "grpc://host", "grpc://:5"])
def test_an_address_that_is_no_address_is_one_line(tmp_path: Path, url: str) -> None:
    _one_line(_tauopt("best", "--storage", url, cwd=tmp_path), "is not a proxy address")


@pytest.mark.parametrize("command", [["worker"], ["create"], ["best"], ["dashboard"]])
def test_nothing_listening_at_a_proxy_address_is_one_line(
    tmp_path: Path, command: list[str]
) -> None:
    url = f"grpc://127.0.0.1:{free_port()}"
    start = time.monotonic()
    done = _tauopt(*command, "--storage", url, cwd=tmp_path)
    _one_line(done, f"nothing answers at {url} within 10 s")
    assert time.monotonic() - start < 120  # not the 300 s a restart is waited for
    assert not (tmp_path / "tauopt.db").exists()


def test_the_proxy_logs_what_its_calls_cost(study: Path) -> None:
    """``--stats S``: a line every S seconds with the calls served and their CPU, per kind;
    nothing for a quiet interval; a value that is no number of seconds is one line."""
    proxy = Proxy(study, "--stats", "1")
    try:
        for _ in range(2):
            done = _tauopt("best", "--storage", f"grpc://127.0.0.1:{proxy.port}", cwd=study)
            assert done.returncode == 0, done.stderr
        time.sleep(2.5)
    finally:
        log = proxy.stop()
    lines = [line for line in log.splitlines() if "calls in the last" in line]
    assert lines, log
    assert "s of CPU" in lines[0] and "ms each" in lines[0] and "GetStudyIdFromName" in log
    _one_line(_tauopt("proxy", "--stats", "-1", cwd=study), "--stats")


def test_a_stats_line_adds_up_what_changed() -> None:
    from tauopt.storage._callstats import MethodStats, summary

    before = {"Beat": MethodStats(4, 0.01, 0.02)}
    now = {"Beat": MethodStats(10, 0.04, 0.05), "GetTrial": MethodStats(2, 0.5, 0.6)}
    assert summary(now, before, 10.0) == (
        "calls in the last 10 s: 8, 0.5 s of CPU (5 % of a core): GetTrial 2 (250.0 ms each), "
        "Beat 6 (5.0 ms each)"
    )
    assert (
        summary(before, before, 10.0) == "calls in the last 10 s: 0, 0.0 s of CPU (0 % of a core)"
    )
