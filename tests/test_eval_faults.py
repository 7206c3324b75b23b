"""The evaluator under faults, in one go: killed at random points several times, a second run started on the
same directory, the annotation edited between runs, torn and garbage lines in the predictions file, and
every kind of corrupt media, then a launcher killed under its workers.

After the last rerun, every question has exactly one record per setting, none lost or duplicated, and the
records and metrics equal those of one uninterrupted run on the final annotation. Runs use the toy model
with two-token answers on a few dozen questions.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from eval_runs import FIELDS, cli_args, cli_env, launch_command, read_lines
from media_faults import write_faults

from tokreduce.eval import EvalConfig, run_eval
from tokreduce.eval import records as rec

toy = pytest.importorskip("tokreduce.toy")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (toy.path() / "config.json").is_file(), reason="toy checkpoint missing"),
]
DATA = toy.data_path().parent
# Fields of a record that only depend on the annotation, the model and the setting (also answer and hash).
SAME = (*FIELDS, "answer", "category", "item_hash")
# Metrics that only depend on the records (not on timing or memory).
METRICS = ("n", "answered", "scored", "correct", "accuracy", "accuracy_all", "errors", "by_category")
METRICS += ("tokens_in", "tokens_out", "keep_ratio", "prefill_gflops", "flops_ratio")
DEADLINE_S = 300  # for a subprocess to reach a point; only a hang gets near it


def annotations(folder: Path) -> tuple[list[dict], dict[str, str]]:
    """Good video and image questions of the toy split, and one question per kind of fault.

    Returns:
        (annotation rows, {id of a faulty item: the error its records must carry}).
    """
    split = [json.loads(line) for line in toy.data_path().read_text().splitlines()]
    good = [r for r in split if r["media_type"] == "video"][:12] + [r for r in split if r["media_type"] == "image"][:3]
    rows = [{**r, "media": str(DATA / r["media"])} for r in good]
    ask = {"question": "which way does the red circle move ?", "options": ["left", "right", "up", "down"]}
    ask["answer"] = "B"
    errors = {}
    for name, (path, kind, reason) in write_faults(folder / "faults", DATA / good[-1]["media"]).items():
        rows.append({"id": name, "media": str(path), "media_type": kind, **ask})
        errors[name] = reason
    video = str(DATA / good[0]["media"])
    for name, bounds, reason in [("nan_start", {"start": float("nan")}, "bad_time_range"),
                                 ("reversed_bounds", {"start": 1.0, "end": 0.5}, "bad_time_range"),
                                 ("past_the_end", {"start": 30.0, "end": 40.0}, "no_frames")]:  # fmt: skip
        rows.append({"id": name, "media": video, **bounds, **ask})
        errors[name] = reason
    rows.append({"id": "unknown_answer", "media": video, **{**ask, "answer": "sideways"}})
    errors["unknown_answer"] = "unknown_option"
    return rows, errors


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def edit(rows: list[dict]) -> list[dict]:
    """Change one answer (re-scored) and one question (re-run)."""
    rows = [dict(r) for r in rows]
    rows[0]["answer"] = "A" if rows[0]["answer"] != "A" else "B"
    rows[1]["question"] = rows[1]["question"].replace("?", "then ?")
    return rows


def count(run_dir: Path) -> int:
    """Newline-terminated lines in every predictions file of the run (records written so far)."""
    return sum(p.read_bytes().count(b"\n") for p in rec.all_files(run_dir)) if run_dir.exists() else 0


def wait_for(condition, proc: subprocess.Popen) -> None:
    """Poll until ``condition()`` holds or ``proc`` has exited."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition() and proc.poll() is None:
        assert time.monotonic() < deadline, "the run hung"
        time.sleep(0.01)


def check_against(reference: Path, faulted: Path, items: int, settings: int) -> None:
    """The faulted run's records and metrics equal the reference run's; every key exactly once."""
    rows = read_lines(faulted)
    keys = [(r["id"], r["setting"]) for r in rows]
    assert len(keys) == len(set(keys)) == items * settings
    expected = {(r["id"], r["setting"]): r for r in read_lines(reference)}
    assert set(keys) == set(expected)
    for row in rows:
        assert {k: row.get(k) for k in SAME} == {k: expected[(row["id"], row["setting"])].get(k) for k in SAME}
    metrics = [json.loads((d / "metrics.json").read_text())["settings"] for d in (reference, faulted)]
    for a, b in zip(*metrics, strict=True):
        assert {k: a[k] for k in METRICS} == {k: b[k] for k in METRICS}, a["setting"]


def test_killed_concurrent_edited_torn_and_corrupt_loses_and_duplicates_nothing(tmp_path, run_cli):
    rng = random.Random(21)
    first, errors = annotations(tmp_path)
    final = edit(first)
    data = tmp_path / "qa.jsonl"
    flags = ["--dataset", f"jsonl:{data}", "--methods", "random", "--keep", "0.5", "--batch-size", "2",
             "--max-new-tokens", "2", "--no-progress", "--no-plots", "--threads", "1"]  # fmt: skip
    run_dir = tmp_path / "faulted" / "run"
    faulted = [*flags, "--output", str(tmp_path / "faulted"), "--run-name", "run"]

    write(data, final)
    assert run_cli("eval", *flags, "--output", str(tmp_path / "reference"), "--run-name", "run")[0] == 0

    write(data, first)
    kills, refused = 0, False
    for attempt in range(3):
        if attempt == 2:
            write(data, final)  # what the earlier rounds recorded for the two edited items is now stale
        proc = subprocess.Popen(cli_args(*faulted), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start = count(run_dir)
        if not refused:  # a second run on the same directory while this one writes into it: refused
            wait_for(lambda s=start: count(run_dir) > s, proc)
            if proc.poll() is None:
                code, line = run_cli("eval", *faulted, "--methods", "uniform")
                assert code == 1 and f"in use by another run (pid {proc.pid} " in line
                refused = True
        target = start + rng.randint(0, 8)  # a random point to kill at; 0 lands in start-up
        wait_for(lambda t=target: count(run_dir) >= t, proc)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read().decode()[-2000:]
        with open(run_dir / rec.MAIN, "a") as f:  # as if the kill had landed in a write, or a disk had garbled one
            f.write("garbage, not json\n" if attempt == 1 else '{"id": "vid-0')
    assert kills == 3 and refused, "a run finished before the faults could hit it"

    assert run_cli("eval", *faulted)[0] == 0  # the last rerun, in this process
    check_against(tmp_path / "reference" / "run", run_dir, len(first), 2)
    recorded = {(r["id"], r["setting"]): r["error"] for r in read_lines(run_dir)}
    assert {key: error for key, error in recorded.items() if key[0] in errors} == {
        (item, setting): errors[item] for item in errors for setting in ("none@1.0", "random@0.5")
    }
    assert not (run_dir / "run.lock").exists() and not rec.rank_files(run_dir)


def test_killing_the_launcher_stops_its_workers_and_a_rerun_completes(tmp_path):
    # enough work that the workers cannot finish it within the watchdog's poll after the launcher dies
    flags = ["--methods", "random", "--keep", "0.5", "--limit", "48", "--batch-size", "1", "--max-new-tokens", "2",
             "--device", "cpu", "--no-progress", "--no-plots", "--threads", "1", "--run-name", "run"]  # fmt: skip
    run_dir = tmp_path / "two" / "run"
    command = launch_command("torchrun") + ["-m", "tokreduce.cli", "eval", *flags, "--output", str(tmp_path / "two")]
    proc = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: count(run_dir) >= 6, proc)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    workers = children(proc.pid)
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)  # the launcher only: it cannot stop its workers
    proc.wait()
    deadline = time.monotonic() + DEADLINE_S
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "the workers outlived their launcher"
        time.sleep(0.05)
    written = count(run_dir)
    assert written < 48 * 2  # killed part way

    rerun = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=DEADLINE_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    run_eval(EvalConfig(methods=["random"], keep=[0.5], limit=48, batch_size=1, max_new_tokens=2, device="cpu",
                        progress=False, plots=False, threads=1, output=str(tmp_path / "one"), run_name="run"))  # fmt: skip
    check_against(tmp_path / "one" / "run", run_dir, 48, 2)


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
