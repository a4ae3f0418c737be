"""The reliability table (issue #10): bad inputs and faults replayed against the real ``diffad``
command in subprocesses, each checked for exit code, one clear line naming the file, key, URL
or path (no traceback), time to fail, and the state left behind.

Bad inputs fail before any Prefect server starts. The fault case runs one smoke benchmark,
refuses a second one with the same run id, kill -9s the first while it trains, and checks that
its temporary Prefect server dies, then reruns the run id to completion: no MLflow run left
RUNNING, the killed ones closed as KILLED with a note, no stray temporaries.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

DIFFAD = [sys.executable, "-m", "diffad_core.cli"]
REPO = Path(__file__).resolve().parents[2]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_")) and k != "DIFFAD_HOME"}
    env.update({"DIFFAD_HOME": str(home), "PYTHONPATH": str(REPO), **extra})
    return env


def _run(args: list[str], env: dict[str, str], *, timeout: float = 120) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = subprocess.run([*DIFFAD, *args], env=env, capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)
    return proc.returncode, proc.stderr, time.monotonic() - start


@dataclass
class Case:
    """One bad input: how to break things, the command, and the lines stderr must hold."""

    name: str
    command: str  # "benchmark" | "train" | "predict"
    expect: list[str]  # substrings of stderr (files, keys, URLs, paths)
    env: dict[str, str] = field(default_factory=dict)
    seconds: float = 30.0  # time to fail, at most (2 busy cores)


def _break(name: str, data: Path, tmp: Path) -> list[str]:
    """Apply case ``name`` to the tiny dataset; returns the strings stderr must name."""
    weave = data / "weave"
    if name == "missing mask":
        (weave / "ground_truth/hole/000_mask.png").unlink()
        return [f"{weave / 'test/hole/000.png'} has no mask"]
    if name == "40x30 mask":
        Image.fromarray(np.zeros((30, 40), np.uint8)).save(weave / "ground_truth/bend/000_mask.png")
        return [f"{weave / 'ground_truth/bend/000_mask.png'} is 40x30"]
    if name == "two unreadable images":
        for rel in ("train/good/001.png", "test/good/000.png"):
            (weave / rel).write_bytes((weave / rel).read_bytes()[:40])
        return [str(weave / "train/good/001.png"), str(weave / "test/good/000.png")]
    if name == "link out of the root":
        outside = tmp / "outside.png"
        outside.write_bytes((weave / "train/good/002.png").read_bytes())
        (weave / "train/good/002.png").unlink()
        (weave / "train/good/002.png").symlink_to(outside)
        return [f"{weave / 'train/good/002.png'} is a link to {outside}"]
    return []


DATA_CASES = ["missing mask", "40x30 mask", "two unreadable images", "link out of the root"]


def _assert_clear(code: int, err: str, seconds: float, command: str, expect: list[str],
                  limit: float) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"diffad {command}: error: "), err
    for text in expect:
        assert text in err, (text, err)
    assert seconds < limit, f"took {seconds:.1f} s"


def _benchmark_args(data: Path, *more: str) -> list[str]:
    return ["benchmark", "--preset", "smoke", "--dataset", "folder", "--root", str(data),
            "--no-promote", *more]


def test_benchmark_refuses_what_data_verify_rejects(data: Path, tmp_path: Path, home: Path) -> None:
    """All four data cases at once (one subprocess): each bad file gets its own line."""
    expect = [text for name in DATA_CASES for text in _break(name, data, tmp_path)]
    code, err, seconds = _run(_benchmark_args(data, "--run-id", "bad"), _env(home))
    _assert_clear(code, err, seconds, "benchmark", [*expect, f"dataset {data}"], 30)
    assert len(err.strip().splitlines()) == len(expect) + 1, err  # a line per file, a summary
    assert not (home / "results" / "bad").exists() and not (home / "mlflow.db").exists()


def _stores(tmp_path: Path) -> list[tuple[Case, dict[str, str] | None]]:
    file_home = tmp_path / "home-is-a-file"
    file_home.write_text("")
    # Mode 0555 stops everyone but root; root cannot write into sysfs' folders either.
    if os.geteuid() == 0:
        ro_home = Path("/sys/kernel")
    else:
        ro_home = tmp_path / "read-only-home"
        ro_home.mkdir(mode=0o555)
    return [
        (Case("MLflow server unreachable", "benchmark", ["http://127.0.0.1:9", "MLFLOW_TRACKING_URI"],
              {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}), None),
        (Case("Prefect API unreachable", "benchmark", ["http://127.0.0.1:9/api", "PREFECT_API_URL"],
              {"PREFECT_API_URL": "http://127.0.0.1:9/api"}), None),
        (Case("DIFFAD_HOME is a file", "benchmark", [f"DIFFAD_HOME {file_home} is not a folder"]),
         {"DIFFAD_HOME": str(file_home)}),
        (Case("DIFFAD_HOME is a file (train)", "train", [f"DIFFAD_HOME {file_home} is not a folder"]),
         {"DIFFAD_HOME": str(file_home)}),
        (Case("DIFFAD_HOME read-only", "benchmark", [f"DIFFAD_HOME {ro_home} is not writable"]),
         {"DIFFAD_HOME": str(ro_home)}),
    ]


def test_unusable_stores_fail_in_seconds(data: Path, tmp_path: Path, home: Path) -> None:
    for case, env_home in _stores(tmp_path):
        env = _env(home, **case.env)
        if env_home:
            env.update(env_home)
        if case.command == "train":
            args = ["train", "--preset", "smoke", "--set", "data.dataset=folder",
                    "--set", f"data.root={data}", "--category", "weave"]
        else:
            args = _benchmark_args(data, "--run-id", "stores")
        code, err, seconds = _run(args, env)
        _assert_clear(code, err, seconds, case.command, case.expect, case.seconds)
        assert len(err.strip().splitlines()) == 1, (case.name, err)
        assert not (home / "results" / "stores").exists(), case.name


def test_typo_and_bad_keys_fail_in_seconds(data: Path, home: Path, tmp_path: Path) -> None:
    code, err, seconds = _run(_benchmark_args(data, "--category", "wevae"), _env(home))
    _assert_clear(code, err, seconds, "benchmark", ["wevae", str(data)], 20)
    assert len(err.strip().splitlines()) == 1 and "MLflow store" not in err
    code, err, seconds = _run(_benchmark_args(data, "--set", "train.nope=1"), _env(home))
    _assert_clear(code, err, seconds, "benchmark", ["unknown key 'train.nope'"], 20)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    code, err, seconds = _run(["predict", str(image), "--checkpoint", "models:/diffad-folder-weave@champion"],
                              _env(home))
    _assert_clear(code, err, seconds, "predict", ["no MLflow store at"], 20)
    assert not (home / "mlflow.db").exists()


# ----------------------------------------------------------------------------- faults
def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        kids = [p for p, pp in parents.items() if pp == current]
        found += kids
        todo += kids
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _mlflow_runs(home: Path, run_id: str) -> list[tuple[str, str, str | None]]:
    """(run uuid, status, note tag) of the MLflow runs tagged with ``run_id``."""
    with sqlite3.connect(home / "mlflow.db") as db:
        rows = db.execute(
            "SELECT r.run_uuid, r.status, (SELECT value FROM tags n WHERE n.run_uuid = r.run_uuid "
            "AND n.key = 'diffad_note') FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = 'diffad_run_id' AND t.value = ?", (run_id,)).fetchall()
    return [(a, b, c) for a, b, c in rows]


def _leftovers(home: Path) -> list[Path]:
    """Temporary files and staging folders of killed writers anywhere under ``home``."""
    return [p for p in home.rglob(".*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]


def _kill_when(args: list[str], env: dict[str, str], log_path: Path, ready: Callable[[str], bool]) -> None:
    """Run ``diffad args`` until ``ready(its output so far)``, then kill -9 it."""
    with log_path.open("w") as log:
        proc = subprocess.Popen([*DIFFAD, *args], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            deadline = time.monotonic() + 150
            while not ready(log_path.read_text()) and time.monotonic() < deadline:
                assert proc.poll() is None, log_path.read_text()
                time.sleep(0.1)
            assert ready(log_path.read_text()), log_path.read_text()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()


def _kill_in_stage_then_rerun(data: Path, home: Path, tmp_path: Path, run_id: str,
                              sets: tuple[str, ...], stage: str) -> None:
    """kill -9 the benchmark once its log shows ``stage``; then no score partition exists and
    the run's MLflow runs are left RUNNING. The rerun completes: no run left RUNNING, no
    temporaries, the category's partition written."""
    args, env = _benchmark_args(data, "--run-id", run_id, *sets), _env(home)
    _kill_when(args, env, tmp_path / "first.log", lambda out: stage in out)
    scores = home / "results" / run_id / "scores"
    assert not scores.exists() or not [p for p in scores.iterdir() if p.name.startswith("category=")]
    assert any(status == "RUNNING" for _, status, _ in _mlflow_runs(home, run_id))

    code, err, _seconds = _run(args, env, timeout=400)
    assert code == 0, err
    assert not [r for r in _mlflow_runs(home, run_id) if r[1] == "RUNNING"]
    assert _leftovers(home) == []
    assert sorted(p.name for p in scores.iterdir()) == ["category=weave"]


@pytest.mark.slow
def test_kill_during_training_then_rerun(data: Path, home: Path, tmp_path: Path) -> None:
    env = _env(home)
    log = (tmp_path / "first.log").open("w")
    # 300 steps (smoke: 4) so it is still training when the second one starts; the rerun
    # resumes them from the last checkpoint.
    long = ("--set", "train.iterations=300", "--set", "train.checkpoint_every=20")
    first = subprocess.Popen([*DIFFAD, *_benchmark_args(data, "--run-id", "r1", *long)], env=env,
                             stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        # Wait until it trains (its checkpoint folder exists), with its server running.
        deadline = time.monotonic() + 150
        while not list((home / "checkpoints").glob("folder/weave/*")) and time.monotonic() < deadline:
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.5)
        servers = [p for p in _children(first.pid) if "-m uvicorn" in _cmdline(p)]
        assert len(servers) == 1, (tmp_path / "first.log").read_text()

        # Concurrent run with the same id: refused in seconds, naming the holder.
        code, err, seconds = _run(_benchmark_args(data, "--run-id", "r1", *long), env)
        _assert_clear(code, err, seconds, "benchmark", ["run r1 is in use by pid "
                                                        f"{first.pid}", ".r1.lock"], 30)

        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        deadline = time.monotonic() + 15
        while _alive(servers[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(servers[0]), "the temporary Prefect server outlived its parent"
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    stale = _mlflow_runs(home, "r1")
    assert any(status == "RUNNING" for _, status, _ in stale)  # what kill -9 leaves

    code, err, _seconds = _run(_benchmark_args(data, "--run-id", "r1", *long), env, timeout=400)
    assert code == 0, err
    runs = _mlflow_runs(home, "r1")
    assert not [r for r in runs if r[1] == "RUNNING"], runs
    killed = [r for r in runs if r[0] in {s[0] for s in stale if s[1] == "RUNNING"}]
    assert killed and all(status == "KILLED" and note for _, status, note in killed), killed
    assert _leftovers(home) == []
    assert sorted(p.name for p in (home / "results/r1/scores").iterdir()) == ["category=weave"]


@pytest.mark.slow
def test_kill_during_reconstruction_then_rerun(data: Path, home: Path, tmp_path: Path) -> None:
    """kill -9 after training, while Algorithm 1 runs: nothing of the category's results is
    half-written, and the rerun restores the trained model and completes."""
    slow = ("--set", "reconstruct.rounds=400", "--set", "reconstruct.max_images_per_category=4")
    _kill_in_stage_then_rerun(data, home, tmp_path, "r2", slow, "reconstruct weave")


@pytest.mark.slow
def test_kill_during_scoring_then_rerun(data: Path, home: Path, tmp_path: Path) -> None:
    """kill -9 while Eq. 11 scores the test split: no partition of the category is left (the
    partition is written whole or not at all), and the rerun completes."""
    # Eq. 11 at 249 timesteps instead of 3, one image at a time: seconds of scoring to kill.
    slow = ("--set", f"diffusion.score_timesteps=[{','.join(str(t) for t in range(1, 250))}]",
            "--set", "score.batch_size=1", "--set", "reconstruct.enabled=false")
    _kill_in_stage_then_rerun(data, home, tmp_path, "r3", slow, "score weave")


@pytest.mark.slow
def test_two_runs_training_one_model_train_it_once(data: Path, home: Path, tmp_path: Path) -> None:
    """Two benchmarks with different run ids, started together, need the same model: one trains
    it while the other waits on the checkpoint folder's lock, naming the holder, then reuses
    the finished model."""
    env = _env(home)
    long = ("--set", "train.iterations=400", "--set", "train.checkpoint_every=50")
    procs, logs = {}, {}
    for run_id in ("a", "b"):  # the same start-up work each: their training would overlap
        logs[run_id] = tmp_path / f"{run_id}.log"
        with logs[run_id].open("w") as log:
            procs[run_id] = subprocess.Popen([*DIFFAD, *_benchmark_args(data, "--run-id", run_id, *long)],
                                             env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        codes = {run_id: proc.wait(timeout=400) for run_id, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    text = {run_id: path.read_text() for run_id, path in logs.items()}
    assert codes == {"a": 0, "b": 0}, text
    waited = [run_id for run_id in procs if "waiting for checkpoint folder" in text[run_id]]
    assert len(waited) == 1, text
    holder = procs["b" if waited == ["a"] else "a"].pid
    assert f"pid {holder}" in text[waited[0]], text
    (folder,) = [p for p in (home / "checkpoints").glob("folder/weave/*") if p.is_dir()]
    assert (folder / "model.safetensors").is_file()
    for run_id in ("a", "b"):
        status = json.loads((home / "results" / run_id / "status" / "weave.json").read_text())
        assert status["status"] == "done" and status["checkpoint_dir"] == str(folder), status


@pytest.mark.slow
def test_kill_while_synthesizing_then_rerun(home: Path, tmp_path: Path) -> None:
    """kill -9 while the synthetic data is written: no category is half there, and the rerun
    clears the killed writer's staging folder, writes the data and completes."""
    env = _env(home)
    args = ["benchmark", "--preset", "smoke", "--category", "weave", "--no-promote", "--run-id", "r6",
            "--set", "data.synth.n_train=300", "--set", "data.synth.size=96"]
    data_root = home / "data" / "synthetic"
    _kill_when(args, env, tmp_path / "first.log",
               lambda _out: bool(list(data_root.glob(".tmp-synth-weave-*/train"))))
    assert list(data_root.glob(".tmp-synth-weave-*"))  # killed mid-write
    assert not (data_root / "weave").exists()

    code, err, _seconds = _run(args, env, timeout=400)
    assert code == 0, err
    assert _leftovers(home) == []
    assert len(list((data_root / "weave" / "train" / "good").glob("*.png"))) == 300
