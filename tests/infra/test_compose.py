"""Static checks of infra/: the compose file, the Dockerfiles (a small linter), the init script.

No Docker engine runs here; ``docker compose config -q`` is run only where the compose CLI exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
COMPOSE = INFRA / "docker-compose.yml"
SERVICES = {"postgres", "prefect-server", "mlflow", "gpu-worker-0", "gpu-worker-1"}


# ----------------------------------------------------------------------------- Dockerfile lint
@dataclass
class _Instruction:
    line: int
    keyword: str
    args: str
    comment: str  # the comment lines just above the instruction


def _parse_dockerfile(text: str) -> list[_Instruction]:
    """Instructions with their continuation lines joined (comments inside a RUN are dropped)."""
    out: list[_Instruction] = []
    comments: list[str] = []
    buf, start = "", 0
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            comments = comments + [line] if line.startswith("#") else []
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = no
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        out.append(_Instruction(start, keyword.upper(), args.strip(), "\n".join(comments)))
        buf, comments = "", []
    if buf:
        raise ValueError("Dockerfile ends inside a line continuation")
    return out


def lint_dockerfile(text: str) -> list[str]:
    """Problems found in a Dockerfile (empty list: clean)."""
    problems: list[str] = []
    ins = _parse_dockerfile(text)
    if not ins:
        return ["no instructions"]
    first = next((i for i in ins if i.keyword != "ARG"), None)
    if first is None or first.keyword != "FROM":
        problems.append("the first instruction (after ARGs) must be FROM")
    for i in ins:
        if i.keyword == "FROM":
            image = i.args.split()[0]
            if image.startswith("--platform"):
                image = i.args.split()[1]
            name = image.rsplit("/", 1)[-1]
            if "@sha256:" not in image and (":" not in name or name.endswith(":latest")):
                problems.append(f"line {i.line}: FROM {image} must pin a tag other than latest")
        if i.keyword == "RUN":
            for cmd in re.split(r"&&|;|\|\|", i.args):
                words = cmd.split()
                if "apt-get" in words and "install" in words and "--no-install-recommends" not in words:
                    problems.append(f"line {i.line}: apt-get install without --no-install-recommends")
                if re.search(r"\bpip3?(\.\d+)?\s+install\b", cmd) or "-m pip install" in cmd:
                    if "--no-cache-dir" not in words:
                        problems.append(f"line {i.line}: pip install without --no-cache-dir")
            if re.search(r"apt-get\s+(update|install)", i.args) and "rm -rf /var/lib/apt/lists" not in i.args:
                problems.append(f"line {i.line}: apt-get without removing /var/lib/apt/lists in the same RUN")
    users = [i for i in ins if i.keyword == "USER"]
    if users:
        last = users[-1]
        if last.args.split(":")[0] in ("root", "0") and "root:" not in last.comment.lower():
            problems.append(f"line {last.line}: runs as root without a '# root: <reason>' comment")
    elif "root:" not in text.lower():
        problems.append("no USER instruction (add a non-root USER or a '# root: <reason>' comment)")
    if not any(i.keyword in ("CMD", "HEALTHCHECK", "ENTRYPOINT") for i in ins):
        problems.append("no CMD, ENTRYPOINT or HEALTHCHECK")
    return problems


def test_lint_catches_bad_dockerfile() -> None:
    bad = (
        "RUN echo hi\nFROM ubuntu:latest\n"
        "RUN apt-get update && apt-get install -y curl\n"
        "RUN pip install numpy\n"
        "USER root\n"
    )
    problems = "\n".join(lint_dockerfile(bad))
    for needle in ("must be FROM", "other than latest", "--no-install-recommends",
                   "/var/lib/apt/lists", "--no-cache-dir", "runs as root", "no CMD"):
        assert needle in problems
    assert "pin a tag" in "\n".join(lint_dockerfile("FROM python\nUSER app\nCMD x\n"))
    good = ("ARG V=1\nFROM python:3.11-slim\n# comment\nRUN apt-get update \\\n"
            "    && apt-get install -y --no-install-recommends curl \\\n"
            "    && rm -rf /var/lib/apt/lists/*\nRUN pip install --no-cache-dir x\n"
            "USER app\nCMD [\"x\"]\n")
    assert lint_dockerfile(good) == []


@pytest.mark.parametrize("name", ["Dockerfile.gpu-worker", "Dockerfile.mlflow"])
def test_dockerfiles_lint_clean(name: str) -> None:
    path = INFRA / name
    assert path.is_file(), f"{path} missing"
    assert lint_dockerfile(path.read_text()) == [], path


def test_gpu_worker_dockerfile_content() -> None:
    text = (INFRA / "Dockerfile.gpu-worker").read_text()
    ins = _parse_dockerfile(text)
    assert ins[0].keyword == "FROM" and ins[0].args.startswith("nvidia/cuda:")
    runs = " ".join(i.args for i in ins if i.keyword == "RUN")
    assert "python3.11" in runs and "torch==2.14.1" in runs and "pip install --no-cache-dir ." in runs
    cmd = next(i for i in ins if i.keyword == "CMD").args
    assert all(w in cmd for w in ('"worker"', '"--pool"', '"gpu"', '"--limit"', '"1"'))
    # COPY sources exist relative to the build context (the repository root)
    root = INFRA.parent
    for i in ins:
        if i.keyword == "COPY" and not i.args.startswith("--from"):
            for src in i.args.split()[:-1]:
                assert (root / src).exists(), f"COPY source {src} missing"
    mlflow = (INFRA / "Dockerfile.mlflow").read_text()
    assert "mlflow==" in mlflow and "psycopg2-binary" in mlflow and "HEALTHCHECK" in mlflow


# ----------------------------------------------------------------------------- compose
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_structure(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    declared_volumes = set(compose.get("volumes") or {})
    declared_networks = set(compose.get("networks") or {})
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, f"service {name} has neither image nor build"
        if "build" in svc:
            build = svc["build"]
            context = (INFRA / build.get("context", ".")).resolve()
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"service {name}: {dockerfile} missing"
        if "image" in svc:
            assert not svc["image"].endswith(":latest") and ":" in svc["image"], name
        deps = svc.get("depends_on") or {}
        for dep in deps:
            assert dep in services, f"service {name} depends on unknown {dep}"
        for vol in svc.get("volumes") or []:
            src = vol.split(":")[0]
            if src.startswith((".", "/")):
                assert (INFRA / src).exists(), f"service {name}: bind source {src} missing"
            else:
                assert src in declared_volumes, f"service {name}: volume {src} not declared"
        for net in svc.get("networks") or []:
            assert net in declared_networks, f"service {name}: network {net} not declared"
        for port in svc.get("ports") or []:
            host, container = re.sub(r"\$\{[^}]*:-(\d+)\}", r"\1", str(port)).rsplit(":", 1)
            assert 0 < int(host) < 65536 and 0 < int(container) < 65536, (name, port)
    # a service waited on as healthy must have a healthcheck (here or in its Dockerfile)
    for name, svc in services.items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            if isinstance(spec, dict) and spec.get("condition") == "service_healthy":
                target = services[dep]
                dockerfile_hc = False
                if "build" in target:
                    df = (INFRA / target["build"].get("context", ".")) / target["build"]["dockerfile"]
                    dockerfile_hc = "HEALTHCHECK" in df.read_text()
                assert "healthcheck" in target or dockerfile_hc, f"{dep} has no healthcheck"


def test_compose_services_config(compose: dict) -> None:
    s = compose["services"]
    pg = s["postgres"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any("/docker-entrypoint-initdb.d" in v for v in pg["volumes"])
    sql = (INFRA / "postgres-init" / "01-databases.sql").read_text().lower()
    assert "create database prefect" in sql and "create database mlflow" in sql

    prefect = s["prefect-server"]
    assert prefect["image"] == "prefecthq/prefect:3-python3.11"
    assert prefect["command"][:3] == ["prefect", "server", "start"] and "0.0.0.0" in prefect["command"]
    url = prefect["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and url.endswith("@postgres:5432/prefect")

    mlflow = s["mlflow"]
    cmd = mlflow["command"]
    store = cmd[cmd.index("--backend-store-uri") + 1]
    # the driver the image installs (SQLAlchemy >= 2.1 maps a bare postgresql:// to psycopg 3)
    assert store.startswith("postgresql+psycopg2://") and store.endswith("@postgres:5432/mlflow")
    assert "psycopg2-binary" in (INFRA / "Dockerfile.mlflow").read_text()
    assert cmd[cmd.index("--artifacts-destination") + 1] == "/mlartifacts" and "--serve-artifacts" in cmd
    assert any(v.endswith(":/mlartifacts") for v in mlflow["volumes"])

    for name in ("gpu-worker-0", "gpu-worker-1"):
        w = s[name]
        env = w["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["DIFFAD_HOME"] == "/diffad"
        assert any(v.endswith(":/diffad") for v in w["volumes"])
        devices = w["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert len(devices[0]["device_ids"]) == 1
        assert w["command"][:3] == ["prefect", "worker", "start"] and "--limit" in w["command"]
    ids = {s[n]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0]
           for n in ("gpu-worker-0", "gpu-worker-1")}
    assert ids == {"0", "1"}


def test_env_example_covers_compose_variables() -> None:
    used = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text()))
    example = (INFRA / ".env.example").read_text()
    defined = set(re.findall(r"^([A-Z_]+)=", example, flags=re.M))
    assert used <= defined, f"variables without an example: {used - defined}"
    readme = (INFRA / "README.md").read_text()
    for needle in ("docker compose", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "DIFFAD_HOME",
                   "CUDA_VISIBLE_DEVICES", "--limit 1"):
        assert needle in readme


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True,
                               timeout=30, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config(tmp_path: Path) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose CLI installed here")
    env = tmp_path / ".env"
    env.write_text((INFRA / ".env.example").read_text())
    proc = subprocess.run([*cli, "-f", str(COMPOSE), "--env-file", str(env), "--profile", "gpu",
                           "--profile", "multi-gpu", "config", "-q"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
