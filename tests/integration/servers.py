"""Real servers on 127.0.0.1 for the integration tests: PostgreSQL, a Prefect server, an MLflow
tracking server and Prefect workers, each in the test's temporary folder.

:class:`Servers` starts them and stops everything it started, in reverse order; the ``servers``
fixture (conftest.py) does that even when the test fails. The one copy of these helpers the
integration tests share.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
MLFLOW = str(BIN / "mlflow")
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# Debian's postgresql-15 package (issue 12); other versioned folders or PATH as a fallback.
_PG_BIN_DIRS = [Path("/usr/lib/postgresql/15/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api(url: str, method: str = "GET", body: Any = None) -> Any:
    """One JSON call to a server's REST API."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        raise AssertionError(f"{method} {url}: {err.code} {err.read().decode(errors='replace')}") from err


def tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def prefect_cli(args: list[str], env: dict[str, str], timeout: int = 120) -> str:
    out = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def client_env(tmp: Path, mlflow_uri: str | None = None) -> dict[str, str]:
    """The environment of every client and worker: this test's Prefect home, DIFFAD_HOME and
    MLflow store (None: set later, e.g. by :meth:`Servers.mlflow_server`); none of the
    caller's PREFECT_*/MLFLOW_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({
        "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1", "PREFECT_CLI_PROMPT": "false", "PREFECT_LOGGING_LEVEL": "INFO",
        "DIFFAD_HOME": str(tmp / "home"), "DIFFAD_REPO": str(REPO),
        "PYTHONUNBUFFERED": "1",
    })
    if mlflow_uri is not None:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    return env


@dataclass
class Postgres:
    """A throw-away cluster: superuser ``diffad`` with a random password, TCP on 127.0.0.1."""

    port: int
    password: str

    def url(self, database: str, driver: str = "") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://diffad:{self.password}@127.0.0.1:{self.port}/{database}"


def postgres_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``, None where PostgreSQL is not installed."""
    for d in _PG_BIN_DIRS:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and shutil.which("initdb") else None


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: as root, run them as the ``postgres`` system
    user (Debian's package creates it)."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


# How long a process may take to exit after SIGTERM before it gets SIGKILL. Prefect workers that
# have run flows sometimes never exit on SIGTERM (their log ends at "Received SIGINT"); the
# servers exit within a second.
_STOP_SECONDS = 10


@dataclass
class Servers:
    """What a test started; :meth:`stop_all` (run by the fixture) stops it."""

    tmp: Path
    _stops: list[Callable[[], None]] = field(default_factory=list)
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _kill_at: dict[int, float] = field(default_factory=dict)  # pid -> when SIGKILL follows SIGTERM

    def process(self, cmd: list[str], env: dict[str, str], log_name: str) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in its own session (so its children stop with it), output to a log."""
        log = self.tmp / log_name
        fh = open(log, "wb")  # noqa: SIM115 - closed when the process is stopped
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self._processes.append(proc)

        def _stop() -> None:
            self._terminate(proc)
            try:
                proc.wait(timeout=max(0.0, self._kill_at.get(proc.pid, 0.0) - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
            fh.close()

        self._stops.append(_stop)
        return proc

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM to the process's session, once; SIGKILL is due ``_STOP_SECONDS`` later."""
        if proc.poll() is None and proc.pid not in self._kill_at:
            self._kill_at[proc.pid] = time.monotonic() + _STOP_SECONDS
            os.killpg(proc.pid, signal.SIGTERM)

    def stop_all(self) -> None:
        """Every process is sent SIGTERM at once, latest first, so their grace periods run
        together: a teardown waits one ``_STOP_SECONDS`` at most, not one per process that ignores
        SIGTERM. Then every stop runs in reverse order (each waits for its process until its
        grace period ends, then kills it; PostgreSQL's stop comes after the servers using it)."""
        for proc in reversed(self._processes):
            self._terminate(proc)
        while self._stops:
            self._stops.pop()()

    def wait_healthy(self, url: str, proc: subprocess.Popen[bytes], log_name: str,
                     timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(url, timeout=10).read()
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"{url} did not become healthy:\n{tail(self.tmp / log_name)}")
                time.sleep(1)

    def prefect_server(self, env: dict[str, str], database_url: str | None = None) -> str:
        """``prefect server start`` on a free port (its own SQLite database under PREFECT_HOME,
        or ``database_url``); returns the API URL and sets PREFECT_API_URL in ``env``."""
        port = free_port()
        server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
        if database_url:
            server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        proc = self.process([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            server_env, "prefect-server.log")
        url = f"http://127.0.0.1:{port}/api"
        self.wait_healthy(f"{url}/health", proc, "prefect-server.log")
        env["PREFECT_API_URL"] = url
        return url

    def mlflow_server(self, env: dict[str, str], backend_store_uri: str) -> str:
        """``mlflow server`` on a free port with its artifacts in a folder of their own (served
        by the server, as in infra/docker-compose.yml); returns the URL and sets
        MLFLOW_TRACKING_URI in ``env``."""
        port = free_port()
        artifacts = self.tmp / "mlflow-artifacts"
        artifacts.mkdir()
        proc = self.process([MLFLOW, "server", "--backend-store-uri", backend_store_uri,
                             "--artifacts-destination", str(artifacts), "--serve-artifacts",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
                            env, "mlflow-server.log")
        url = f"http://127.0.0.1:{port}"
        self.wait_healthy(f"{url}/health", proc, "mlflow-server.log")
        env["MLFLOW_TRACKING_URI"] = url
        return url

    def postgres(self, databases: list[str]) -> Postgres:
        """A fresh cluster in a temporary folder (owned by the ``postgres`` user when we are
        root), listening on 127.0.0.1 only, with ``databases`` created; skips where PostgreSQL
        is not installed."""
        bindir = postgres_bin()
        if bindir is None:
            pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl in /usr/lib/postgresql/*/bin "
                        "or on PATH; Debian: apt-get install postgresql)")
        if os.geteuid() == 0 and shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        # Not under pytest's tmp_path: that folder is private to root, and the server runs as postgres.
        base = Path(tempfile.mkdtemp(prefix="diffad-pg-"))
        self._stops.append(lambda: shutil.rmtree(base, ignore_errors=True))
        if os.geteuid() == 0:
            shutil.chown(base, "postgres", "postgres")
        pg = Postgres(port=free_port(), password=secrets.token_hex(12))
        pwfile = base / "pw"
        pwfile.write_text(pg.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        data, log = base / "data", base / "server.log"

        def run(cmd: list[str]) -> None:
            out = subprocess.run(_as_postgres_user(cmd), capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, f"{cmd[0]} failed:\n{out.stdout}\n{out.stderr}\n{tail(log)}"

        run([str(bindir / "initdb"), "-D", str(data), "-U", "diffad", "--pwfile", str(pwfile),
             "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"])
        options = f"-h 127.0.0.1 -p {pg.port} -k {base} -c fsync=off"
        run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start"])
        self._stops.append(lambda: subprocess.run(
            _as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            capture_output=True, timeout=120, check=False))
        for db in databases:
            out = subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(pg.port),
                                  "-U", "diffad", db], env={**os.environ, "PGPASSWORD": pg.password},
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, f"createdb {db} failed:\n{out.stderr}"
        return pg


def wait_for_flow_run(api_url: str, flow_run_id: str, timeout: float, logs: list[Path]) -> dict[str, Any]:
    """Poll until the flow run reaches a final state; fail with the workers' logs otherwise."""
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = api(f"{api_url}/flow_runs/{flow_run_id}")["state"]
        if state and state["type"] in FINAL_STATES:
            break
        time.sleep(3)
    details = "\n".join(f"--- {p.name}\n{tail(p)}" for p in logs)
    assert state is not None and state["type"] == "COMPLETED", f"{state}\n{details}"
    return state


# Tiny smoke-preset runs: a few images, two training steps (the deployment tests check the
# plumbing, not the numbers).
SMOKE_OVERRIDES = [
    "data.synth.n_train=4", "data.synth.n_test_good=1", "data.synth.n_test_per_defect=1",
    "train.iterations=2", "reconstruct.max_images_per_category=1", "reconstruct.rounds=1",
    "runtime.num_threads=1",
]


@dataclass
class DeployedRun:
    """A full-benchmark flow run through the deployments of infra/prefect.yaml."""

    flow_run_id: str
    children: list[dict[str, Any]]  # the train-category flow runs it started
    logs: list[Path]


def run_benchmark_deployment(servers: Servers, env: dict[str, str], api_url: str, run_id: str,
                             overrides: list[str], timeout: float = 300) -> DeployedRun:
    """Create the ``control`` and ``gpu`` process pools, deploy ``full-benchmark`` and
    ``train-category`` from infra/prefect.yaml, start one control worker and two gpu workers
    (``--limit 1`` each, as one per GPU), run full-benchmark on the smoke preset with
    ``executor=deployments`` and wait for it to complete."""
    for pool in ("control", "gpu"):
        prefect_cli(["work-pool", "create", pool, "--type", "process"], env)
    prefect_cli(["deploy", "--prefect-file", "infra/prefect.yaml", "--name", "train-category",
                 "--name", "full-benchmark"], env, timeout=180)
    parent = api(f"{api_url}/deployments/name/full-benchmark/full-benchmark")
    assert parent["work_pool_name"] == "control"
    child = api(f"{api_url}/deployments/name/train-category/train-category")
    assert child["work_pool_name"] == "gpu"

    run = api(f"{api_url}/deployments/{parent['id']}/create_flow_run", "POST", {
        "parameters": {"preset": "smoke", "run_id": run_id,
                       "overrides": [*SMOKE_OVERRIDES, "runtime.executor=deployments", *overrides]},
    })
    # Workers poll every 2 s (default 10 s), so both gpu workers pick a category up at once.
    worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}
    logs = [servers.tmp / "worker-control.log"]
    servers.process([PREFECT, "worker", "start", "--pool", "control"], worker_env, logs[0].name)
    for i in (0, 1):
        logs.append(servers.tmp / f"worker-gpu-{i}.log")
        servers.process([PREFECT, "worker", "start", "--pool", "gpu", "--limit", "1",
                         "--name", f"gpu-{i}"], worker_env, logs[-1].name)
    wait_for_flow_run(api_url, run["id"], timeout, logs)
    children = api(f"{api_url}/flow_runs/filter", "POST", {
        "flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}, "limit": 50})
    return DeployedRun(run["id"], [c for c in children if c["deployment_id"] == child["id"]], logs)
