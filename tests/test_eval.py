"""tokreduce.eval and tokreduce.video: sampling, decoding, dataset formats, records, resumable runs.

End-to-end runs use the bundled toy checkpoint and a few of its test videos; they check invariants
(hand counts, no lost or duplicated records, equal results across process counts), not accuracy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from eval_runs import FIELDS, cli_args, cli_env, launch_command, read_lines
from media_faults import write_faults

from tokreduce.eval import DATASETS, EvalConfig, load_dataset, parse_letter, run_eval
from tokreduce.eval import records as rec
from tokreduce.eval.command import add_arguments, config_from_args
from tokreduce.eval.config import parse_keep
from tokreduce.video import VideoError, available_backends, read_frames, sample_indices

RESOURCES = Path(__file__).parent / "resources" / "eval"
toy = pytest.importorskip("tokreduce.toy")
HAVE_TOY = (toy.path() / "config.json").is_file()
needs_toy = pytest.mark.skipif(not HAVE_TOY, reason="toy checkpoint missing")
TOY_VIDEOS = toy.data_path().parent / "videos"
# -- frame sampling ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("total", [1, 2, 7, 8, 9, 31, 100, 1001])
@pytest.mark.parametrize("k", [1, 4, 8, 16])
def test_uniform_indices_are_unique_sorted_in_range(total, k):
    idx = sample_indices(total, k)
    assert len(idx) == min(total, k)
    assert idx == sorted(set(idx))
    assert 0 <= idx[0] and idx[-1] < total


def test_uniform_indices_are_segment_centres():
    assert sample_indices(100, 4) == [12, 37, 62, 87]
    assert sample_indices(8, 8) == list(range(8))
    assert sample_indices(3, 8) == [0, 1, 2]  # short clip: every frame once, never duplicated
    assert sample_indices(0, 8) == []


def test_bounded_and_fps_sampling():
    assert sample_indices(100, 8, "uniform", fps=10, start=2, end=5) == [21, 25, 29, 33, 37, 41, 45, 49]
    assert sample_indices(100, 20, "fps", fps=10, target_fps=1) == list(range(0, 100, 10))
    thinned = sample_indices(100, 4, "fps", fps=10, target_fps=1)
    assert len(thinned) == 4 and set(thinned) <= set(range(0, 100, 10))
    assert sample_indices(100, 8, fps=10, start=20, end=30) == []  # bounds past the end
    with pytest.raises(ValueError, match="sampling"):
        sample_indices(10, 4, "random")
    with pytest.raises(ValueError, match="fps"):
        sample_indices(10, 4, start=1.0)


# -- decoding ------------------------------------------------------------------------------------------------
def _write_video(path: Path, frames: int, fps: int = 10, size: int = 32) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.full((size, size, 3), (i * 9) % 256, np.uint8)
            image[: i % size, :, 1] = 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize("frames", [3, 37])
def test_decord_and_pyav_decode_the_same_frames(tmp_path, frames):
    if set(available_backends()) != {"decord", "pyav"}:
        pytest.skip("needs both decord and PyAV")
    path = tmp_path / "clip.mp4"
    _write_video(path, frames)
    for video in (path, TOY_VIDEOS / "vid-00000.mp4"):
        for k in (1, 4, 8):
            a = read_frames(video, k, backend="decord")
            b = read_frames(video, k, backend="pyav")
            assert a.indices == b.indices and a.total == b.total and a.fps == b.fps
            assert a.array.shape == b.array.shape and a.array.dtype == np.uint8
            assert np.abs(a.array.astype(int) - b.array.astype(int)).mean() < 2.0


def test_each_backend_reads_sampled_frames(tmp_path):
    path = tmp_path / "clip.mp4"
    _write_video(path, 37)
    for backend in available_backends():
        frames = read_frames(path, 8, backend=backend)
        assert frames.indices == sample_indices(37, 8) and frames.array.shape == (8, 32, 32, 3)
        assert frames.backend == backend


def test_every_fault_has_one_label_under_every_backend(tmp_path):
    from tokreduce.image import ImageError, read_image

    faults = write_faults(tmp_path, next((TOY_VIDEOS.parent / "images").iterdir()))
    for name, (path, kind, reason) in faults.items():
        if kind == "video":
            readers = [lambda p, b=b: read_frames(p, backend=b) for b in available_backends()]
        else:
            readers = [read_image]
        for read in readers:
            with pytest.raises((VideoError, ImageError)) as e:
                read(path)
            assert e.value.reason == reason, (name, str(e.value))
    video = TOY_VIDEOS / "vid-00000.mp4"  # 8 frames at 4 fps
    for backend in available_backends():
        for start, end, reason in [(float("nan"), None, "bad_time_range"), (2.0, 1.0, "bad_time_range"),
                                   (-1.0, None, "bad_time_range"), (None, float("inf"), "bad_time_range"),
                                   (5.0, 9.0, "no_frames")]:  # fmt: skip
            with pytest.raises(VideoError) as e:
                read_frames(video, start=start, end=end, backend=backend)
            assert e.value.reason == reason, (backend, start, end, str(e.value))
    with pytest.raises(ValueError, match="backend"):
        read_frames(video, backend="opencv")


# -- dataset formats -----------------------------------------------------------------------------------------
def test_every_format_parses_its_example():
    examples = {
        "jsonl": RESOURCES / "generic.jsonl",
        "mvbench": RESOURCES / "mvbench",
        "videomme": RESOURCES / "videomme.json",
        "nextqa": RESOURCES / "nextqa.csv",
        "egoschema": RESOURCES / "egoschema" / "questions.json",
    }
    assert set(examples) | {"toy"} == set(DATASETS)
    loaded = {name: load_dataset(name, path) for name, path in examples.items()}

    q1, q2, q3, q4 = loaded["jsonl"]
    assert (q1.answer, q2.answer, q3.answer) == ("B", "A", "C")  # letter, index, option text
    assert q3.options == ["circle", "square", "triangle"] and (q3.start, q3.end) == (0.5, 2.0)
    assert q1.media_key() == q2.media_key() != q3.media_key()  # grouped by clip
    assert q4.answer is None and q4.error.startswith("unknown_option")
    assert Path(q1.video) == RESOURCES / "videos" / "clip1.mp4"

    mv = loaded["mvbench"]
    assert [it.answer for it in mv] == ["A", "C"] and mv[0].category == "action_sequence"
    assert (mv[0].start, mv[0].end) == (11.1, 19.6) and mv[1].start is None

    vm = loaded["videomme"]
    assert [it.answer for it in vm] == ["C", "A"] and vm[0].options[0] == "Apples."
    assert Path(vm[0].video).name == "fFjv93ACGo8.mp4" and vm[0].extra["duration"] == "short"

    nq = loaded["nextqa"]
    assert [it.answer for it in nq] == ["A", "E"] and len(nq[0].options) == 5
    assert nq[0].id == "4010069381-6" and Path(nq[0].video) == RESOURCES / "1106" / "4010069381.mp4"

    ego = loaded["egoschema"]
    assert ego[0].answer == "D" and ego[1].answer is None and ego[1].error is None and len(ego[0].options) == 5


def test_toy_dataset_is_the_video_split():
    items = load_dataset("toy", limit=5)
    assert len(items) == 5 and all(it.media_type == "video" and Path(it.video).is_file() for it in items)


def test_dataset_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "video": "v.mp4", "question": "q", "options": ["x", "y"], "answer": "A"}\n' * 2)
    with pytest.raises(ValueError, match="duplicate item ids"):
        load_dataset("jsonl", bad)
    bad.write_text('{"id": "a", "question": "q", "options": ["x", "y"]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field\(s\) \['video'\]"):
        load_dataset("jsonl", bad)
    with pytest.raises(ValueError, match="unknown dataset format"):
        load_dataset("kinetics", bad)
    with pytest.raises(FileNotFoundError):
        load_dataset("jsonl", tmp_path / "none.jsonl")


def test_parse_letter():
    assert parse_letter("B", 4) == "B"
    assert parse_letter("(C) a square", 4) == "C"
    assert parse_letter("The answer is D.", 4) == "D"
    assert parse_letter("E", 4) is None  # not an option here
    assert parse_letter("I think it is B", 4) == "B"
    assert parse_letter("I think it is B", 9) == "B"  # the pronoun is not option I
    assert parse_letter("", 4) is None


# -- config and CLI ------------------------------------------------------------------------------------------
def test_config_checks_and_names(tmp_path):
    config = EvalConfig(methods=["baselines", "random", "none"], keep=[0.5, 64])
    assert config.methods == ["random", "uniform", "pool"]
    assert config.settings()[0] == ("none", 1.0) and len(config.settings()) == 7
    assert config.default_run_name() == "toy__toy__random+uniform+pool__keep0.5-64__8f"
    config.to_yaml(tmp_path / "c.yaml")
    assert EvalConfig.from_yaml(tmp_path / "c.yaml").to_dict() == config.to_dict()
    assert EvalConfig.from_yaml(tmp_path / "c.yaml", keep=[0.1]).keep == [0.1]
    for bad, match in [
        (dict(methods=["fastvv"]), "unknown method 'fastvv'"),
        (dict(keep=[1.5]), "keep"),
        (dict(dataset="jsonl"), "needs a data path"),
        (dict(frames=0), "frames"),
        (dict(methods=["fastv"], knobs={"fastv": {"depth": 2}}), "no knob"),
        (dict(model="/no/such/dir"), "checkpoint directory"),
    ]:
        with pytest.raises(ValueError, match=match):
            EvalConfig(**bad)
    with pytest.raises(ValueError, match="unknown field"):
        EvalConfig.from_dict({"frame": 8})
    assert parse_keep("0.25") == 0.25 and parse_keep("64") == 64 and isinstance(parse_keep("1"), int)


def test_cli_flags_override_yaml(tmp_path):
    import argparse

    (tmp_path / "c.yaml").write_text("methods: [random]\nkeep: [0.5]\nframes: 4\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--config",
            str(tmp_path / "c.yaml"),
            "--dataset",
            f"jsonl:{RESOURCES / 'generic.jsonl'}",
            "--keep",
            "0.25",
            "16",
            "--knob",
            "random.seed=3",
        ]
    )
    config = config_from_args(args)
    assert config.dataset == "jsonl" and config.data.endswith("generic.jsonl")
    assert config.keep == [0.25, 16] and config.frames == 4 and config.knobs == {"random": {"seed": 3}}
    assert config.batch_size == EvalConfig().batch_size



def test_keep_one_fraction_and_one_token_are_two_budgets():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--methods", "random", "--keep", "1.0", "1", "0.5", "1.0", "1"]))
    assert [(type(k), k) for k in config.keep] == [(float, 1.0), (int, 1), (float, 0.5)]
    assert [s for _, s in config.settings()] == [1.0, 1.0, 1, 0.5]  # baseline, then the three budgets
    assert config.default_run_name().endswith("keep1.0-1-0.5__8f")

# -- records -------------------------------------------------------------------------------------------------
def test_records_survive_a_torn_write(tmp_path):
    path = tmp_path / rec.MAIN
    with rec.RecordWriter(path) as w:
        w.write({"id": "a", "setting": "none@1.0"})
        w.write({"id": "b", "setting": "none@1.0"})
    with open(path, "a") as f:
        f.write('{"id": "c", "sett')  # killed mid-write
    assert [r["id"] for r in rec.read_records(path)] == ["a", "b"]
    with rec.RecordWriter(path) as w:  # the next writer cuts the torn tail
        w.write({"id": "c", "setting": "none@1.0"})
    assert [r["id"] for r in rec.read_records(path)] == ["a", "b", "c"]
    assert path.read_text().count("\n") == 3


def test_merge_sorts_dedups_and_removes_rank_files(tmp_path):
    for rank, ids in ((0, ["b", "a"]), (1, ["c", "a"])):
        with rec.RecordWriter(rec.shard_path(tmp_path, rank, 2)) as w:
            for i in ids:
                w.write({"id": i, "setting": "s", "rank": rank})
    merged = rec.merge(tmp_path, [("a", "s"), ("b", "s"), ("c", "s")])
    assert [(r["id"], r["rank"]) for r in merged] == [("a", 1), ("b", 0), ("c", 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [rec.MAIN]


# -- command line errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("knobs: [1]\n", "knobs must map methods to their knobs"),
        ("methods: [divprune]\nknobs: {divprune: 3}\n", "knobs of divprune must map knob names"),
        ("methods: [random\nkeep: 1\n", "not valid YAML (line 2, column 5)"),
        ("- 1\n- 2\n", "expected a mapping of EvalConfig fields"),
        ("frames: eight\n", "frames must be an int >= 1"),
    ],
)
def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path, run_cli, yaml_text, message):
    (tmp_path / "c.yaml").write_text(yaml_text)
    code, line = run_cli("eval", "--config", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "out"))
    assert code == 2 and message in line
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_bad_flags_are_one_line_and_exit_2(tmp_path, run_cli, monkeypatch):
    out = tmp_path / "out"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('["a list", "not an object"]\n')
    cases = [
        (["--device", "tpu:7"], "device must be auto, cpu, cuda or cuda:N, got 'tpu:7'"),
        (["--methods", "fastv", "--knob", "fastv.layer=abc"], "layer must be an int in [1, 1024], got 'abc'"),
        (["--keep", "abc"], "argument --keep"),
        (["--dataset", f"jsonl:{rows}"], "rows.jsonl:1: expected one JSON object per line, got a list"),
        (["--output", str(blocker / "under")], "Not a directory; pass --output DIR"),
    ]
    for args, message in cases:
        code, line = run_cli("eval", "--limit", "1", "--output", str(out), *args)
        assert code == 2 and message in line, (args, line)
        assert not out.exists()
    # root may write anywhere, so an unwritable folder is the file system's answer, simulated
    monkeypatch.setattr(Path, "mkdir", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    code, line = run_cli("eval", "--limit", "1", "--output", str(out))
    assert code == 2 and "cannot write results in" in line and "Permission denied" in line


@needs_toy
def test_a_knob_the_model_rejects_stops_before_any_item(tmp_path, run_cli):
    code, line = run_cli("eval", "--methods", "random", "fastv", "--knob", "fastv.layer=99", "--limit", "2",
                          "--output", str(tmp_path), "--run-name", "r", "--no-progress")  # fmt: skip
    assert code == 2 and "fastv@0.5 cannot run on this model" in line and "layer must be in [1, 3]" in line
    assert not list((tmp_path / "r").glob("predictions*"))  # not even the baseline ran
    code, _ = run_cli("eval", "--methods", "random", "fastv", "--knob", "fastv.layer=2", "--limit", "2",
                       "--keep", "0.5", "--output", str(tmp_path), "--run-name", "r", "--no-progress", "--no-plots")  # fmt: skip
    assert code == 0  # the corrected knob runs in the same directory


@needs_toy
def test_a_run_where_every_item_failed_exits_1(tmp_path, run_cli):
    data = tmp_path / "qa.jsonl"
    row = {"question": "q ?", "options": ["a", "b"], "answer": "A"}
    data.write_text("".join(json.dumps({"id": f"q{i}", "video": f"gone{i}.mp4", **row}) + "\n" for i in range(3)))
    code, line = run_cli("eval", "--dataset", f"jsonl:{data}", "--methods", "random", "--keep", "0.5",
                          "--output", str(tmp_path / "out"), "--no-progress", "--no-plots")  # fmt: skip
    assert code == 1 and "every item failed in every setting (missing_video 6)" in line


# -- one owner per run directory -----------------------------------------------------------------------------
def test_run_lock_refuses_a_second_owner_and_frees_on_exit(tmp_path):
    import socket

    from tokreduce.eval.errors import RunFailed
    from tokreduce.eval.lock import NAME, RunLock

    first = RunLock.acquire(tmp_path / "run")
    owner = json.loads((tmp_path / "run" / NAME).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(RunFailed, match=rf"in use by another run \(pid {os.getpid()} on host {socket.gethostname()}"):
        RunLock.acquire(tmp_path / "run")
    first.release()
    assert not (tmp_path / "run" / NAME).exists()
    RunLock.acquire(tmp_path / "run").release()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    from tokreduce.eval.lock import NAME, RunLock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tokreduce.eval.lock import RunLock; "
         "RunLock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)", str(tmp_path)],
        env=cli_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=f"pid {holder.pid}"):
            RunLock.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((tmp_path / NAME).read_text())["pid"] == holder.pid  # left behind by the dead run
    lock = RunLock.acquire(tmp_path)
    assert json.loads((tmp_path / NAME).read_text())["pid"] == os.getpid()
    lock.release()


@needs_toy
def test_a_second_run_on_the_same_directory_is_refused_and_loses_nothing(tmp_path):
    from tokreduce.eval.errors import RunFailed

    common = ["--keep", "0.5", "--limit", "12", "--batch-size", "1", "--max-new-tokens", "2", "--output",
              str(tmp_path), "--run-name", "run", "--no-progress", "--no-plots", "--threads", "1"]  # fmt: skip
    first = subprocess.Popen(cli_args("--methods", "random", *common), env=cli_env(), stderr=subprocess.PIPE, text=True)
    predictions = tmp_path / "run" / rec.MAIN
    while first.poll() is None and not (predictions.exists() and predictions.read_bytes().count(b"\n") >= 2):
        time.sleep(0.01)
    assert first.poll() is None, first.stderr.read()[-2000:]
    second = _config(tmp_path, methods=["uniform"], limit=12, batch_size=1, run_name="run")
    with pytest.raises(RunFailed, match=f"in use by another run \\(pid {first.pid} "):
        run_eval(second)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert len(read_lines(tmp_path / "run")) == 12 * 2  # the first run's records, all of them
    metrics = run_eval(second)  # now free: adds its own setting to the same directory
    rows = read_lines(tmp_path / "run")
    keys = {(r["id"], r["setting"]) for r in rows}
    assert len(rows) == len(keys) == 12 * 3 and {r["setting"] for r in rows} == {"none@1.0", "random@0.5", "uniform@0.5"}
    assert [row["n"] for row in metrics["settings"]] == [12, 12]


# -- end to end on the toy model -----------------------------------------------------------------------------
def _config(tmp_path, **kw) -> EvalConfig:
    defaults = dict(
        methods=["random"],
        keep=[0.5],
        limit=4,
        batch_size=2,
        output=str(tmp_path),
        progress=False,
        threads=1,
        max_new_tokens=2,
    )
    return EvalConfig(**{**defaults, **kw})


def _hand_count(rows: list[dict]) -> tuple[int, int]:
    answered = [r for r in rows if r["error"] in (None, "unparsable_answer") and r["answer"] is not None]
    return sum(bool(r["correct"]) for r in answered), len(answered)


def _check_roofline_columns(metrics, records):
    """The roofline and FLOP ideals against the baseline, recomputed from each record's lengths and machine."""
    from tokreduce.flops import LMShape, layer_lengths
    from tokreduce.roofline import Machine, roofline_seconds

    shape = LMShape.from_config(toy.load()[0].config)
    base, rand = metrics["settings"]
    for row in (base, rand):
        mine = [r for r in records if r["setting"] == row["setting"]]
        expected = [
            roofline_seconds(
                shape,
                layer_lengths(shape, r["seq_len"], r["seq_len"] - r["tokens_in"] + r["tokens_out"], 0),
                Machine(r["machine_flops"], r["machine_bandwidth"]),
                itemsize=4,  # the toy runs in float32
            )
            for r in mine
        ]
        assert row["roofline_ms"] == pytest.approx(1000 * sum(expected) / len(expected))
    assert base["roofline_ideal"] == base["flop_ideal"] == base["speedup"] == 1.0
    assert rand["roofline_ideal"] > 1.0 and rand["flop_ideal"] == pytest.approx(1 / rand["flops_ratio"])
    assert rand["achieved_roofline"] == pytest.approx(rand["speedup"] / rand["roofline_ideal"])
    assert "GFLOP/s" in metrics["machine"] and "GB/s" in metrics["machine"]


@needs_toy
def test_end_to_end_metrics_match_a_hand_count_and_rerun_skips(tmp_path):
    config = _config(tmp_path, plots=True)
    metrics = run_eval(config)
    run_dir = config.run_dir()
    rows = read_lines(run_dir)
    assert len(rows) == 4 * 2 and len({(r["id"], r["setting"]) for r in rows}) == 8
    for row in metrics["settings"]:
        mine = [r for r in rows if r["setting"] == row["setting"]]
        correct, scored = _hand_count(mine)
        assert (row["correct"], row["scored"], row["n"]) == (correct, scored, 4)
        assert row["accuracy"] == pytest.approx(correct / scored)
        for r in mine:
            assert r["correct"] == (r["parsed"] == r["answer"])
            assert r["tokens_out"] <= r["tokens_in"] and r["prefill_s"] > 0 and r["batch_size"] == 2
    base, rand = metrics["settings"]
    assert base["setting"] == "none@1.0" and base["tokens_out"] == base["tokens_in"] and base["flops_ratio"] == 1.0
    assert rand["tokens_out"] < rand["tokens_in"] and rand["flops_ratio"] < 1.0
    assert rand["select_ms"] > 0 and base["select_ms"] == 0
    _check_roofline_columns(metrics, rows)
    for name in ("config.yaml", "metrics.json", "summary.md", "accuracy_vs_keep.png", "accuracy_vs_flops.png"):
        assert (run_dir / name).stat().st_size > 0, name
    summary = (run_dir / "summary.md").read_text()
    assert "| random | 0.5 | 4 |" in summary
    for row in metrics["settings"]:  # per-category accuracy, hand-counted from the records
        mine = [r for r in rows if r["setting"] == row["setting"]]
        cells = []
        for cat in sorted({r["category"] for r in rows}):
            correct, scored = _hand_count([r for r in mine if r["category"] == cat])
            cells.append(f"{correct / scored:.3f}")
        assert f"| {row['method']} | {row['keep']} | " + " | ".join(cells) + " |" in summary

    before = (run_dir / rec.MAIN).read_text()
    again = run_eval(config)  # resumes: everything is finished, nothing runs again
    assert (run_dir / rec.MAIN).read_text() == before
    assert [r["accuracy"] for r in again["settings"]] == [r["accuracy"] for r in metrics["settings"]]

    bigger = run_eval(_config(tmp_path, limit=6))  # a larger limit reuses the first 4 items' records
    rows = read_lines(run_dir)
    assert len(rows) == 12 and rows[0] == json.loads(before.splitlines()[0])
    assert bigger["settings"][0]["n"] == 6

    with pytest.raises(ValueError, match="different configuration.*frames"):
        run_eval(_config(tmp_path, frames=4, run_name=run_dir.name))


@needs_toy
def test_an_edited_annotation_is_rescored_and_its_records_rerun(tmp_path, caplog):
    lines = [json.loads(line) for line in toy.data_path().read_text().splitlines() if '"video"' in line][:4]
    data = tmp_path / "qa.jsonl"

    def write(rows):
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    write(lines)
    root = str(toy.data_path().parent)
    config = _config(tmp_path, dataset="jsonl", data=str(data), video_root=root, limit=None, run_name="run")
    before = {r["setting"]: r for r in run_eval(config)["settings"]}
    saved = {(r["id"], r["setting"]): r for r in read_lines(config.run_dir())}

    edited = [dict(r) for r in lines]
    said = saved[(lines[0]["id"], "none@1.0")]["parsed"]  # flip whether the baseline is right about item 0
    wrong = next(letter for letter in "ABCD"[: len(lines[0]["options"])] if letter != lines[0]["answer"])
    edited[0]["answer"] = wrong if said == lines[0]["answer"] else said
    edited[1]["question"] = edited[1]["question"].replace("?", "now ?")
    edited[2]["category"] = "renamed"  # reports follow it; the prediction does not depend on it
    write(edited)
    with caplog.at_level("INFO", logger="tokreduce.eval"):
        after = {r["setting"]: r for r in run_eval(config)["settings"]}
    assert "4 to do" in caplog.text  # items 0 and 1 in both settings: their annotation changed
    rows = {(r["id"], r["setting"]): r for r in read_lines(config.run_dir())}
    assert len(rows) == 4 * 2
    for (item, setting), row in rows.items():
        rerun = item in (lines[0]["id"], lines[1]["id"])
        assert (row == saved[(item, setting)]) != rerun, (item, setting)
    for setting, row in after.items():
        mine = [r for r in rows.values() if r["setting"] == setting]
        truth = {r["id"]: r["answer"] for r in edited}
        assert row["correct"] == sum(r["parsed"] == truth[r["id"]] for r in mine)  # scored against the edit
        assert "renamed" in row["by_category"]
    assert after["none@1.0"]["correct"] != before["none@1.0"]["correct"]


def test_reports_score_records_against_the_current_annotation():
    from tokreduce.eval import QAItem, summarize

    item = QAItem("q", "v.mp4", "what ?", ["x", "y"], answer="B", category="now")
    record = {"id": "q", "setting": "none@1.0", "parsed": "A", "answer": "A", "correct": True, "error": None,
              "category": "then", "item_hash": item.fingerprint(), "tokens_in": 4, "tokens_out": 4, "prefill_s": 0.1,
              "batch_size": 1, "select_s": 0.0, "prefill_flops": 10, "peak_mem_mb": 1.0}  # fmt: skip
    row = summarize([record], [item], [("none", 1.0)])["settings"][0]
    assert (row["correct"], row["scored"], row["accuracy"]) == (0, 1, 0.0)  # saved "correct" was stale
    assert list(row["by_category"]) == ["now"]
    stale = {**record, "item_hash": "0" * 16}  # made from another version of the annotation: not counted
    assert summarize([stale], [item], [("none", 1.0)])["settings"][0]["n"] == 0


@needs_toy
def test_batched_equals_one_at_a_time(tmp_path):
    one = run_eval(_config(tmp_path / "one", batch_size=1, limit=5))
    three = run_eval(_config(tmp_path / "three", batch_size=3, limit=5))
    rows1 = read_lines(_config(tmp_path / "one", batch_size=1).run_dir())
    rows3 = read_lines(_config(tmp_path / "three", batch_size=3).run_dir())
    assert [[r[k] for k in FIELDS] for r in rows1] == [[r[k] for k in FIELDS] for r in rows3]
    assert [r["correct"] for r in one["settings"]] == [r["correct"] for r in three["settings"]]


@needs_toy
@pytest.mark.parametrize("backend", available_backends())
def test_bad_inputs_are_recorded_and_the_run_finishes(tmp_path, backend):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(2):
        shutil.copy(TOY_VIDEOS / f"vid-0000{i}.mp4", videos)
    (videos / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "text.png").write_text("not an image\n")
    good = {
        "question": "which way does the red circle move ?",
        "options": ["left", "right", "up", "down"],
        "answer": "B",
    }
    rows = [
        {"id": "ok0", "video": "videos/vid-00000.mp4", **good},
        {"id": "ok1", "video": "videos/vid-00001.mp4", **good},
        {"id": "ok0-again", "video": "videos/vid-00000.mp4", **good},
        {"id": "corrupt", "video": "videos/corrupt.mp4", **good},
        {"id": "empty", "video": "videos/empty.mp4", **good},
        {"id": "missing", "video": "videos/missing.mp4", **good},
        {"id": "badanswer", "video": "videos/vid-00001.mp4", **{**good, "answer": "sideways"}},
        {"id": "sixopts", "video": "videos/vid-00001.mp4", **{**good, "options": list("abcdef")}},
        {"id": "text-image", "video": "videos/text.png", "media_type": "image", **good},
        {"id": "no-image", "video": "videos/none.png", "media_type": "image", **good},
        {"id": "nan-start", "video": "videos/vid-00000.mp4", "start": float("nan"), **good},
        {"id": "past-end", "video": "videos/vid-00000.mp4", "start": 5.0, "end": 9.0, **good},
    ]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _config(tmp_path, dataset="jsonl", data=str(data), limit=None, batch_size=4, backend=backend)
    metrics = run_eval(config)
    records = {(r["id"], r["setting"]): r for r in read_lines(config.run_dir())}
    assert len(records) == len(rows) * 2
    expect = {
        "corrupt": "corrupt_video",
        "empty": "corrupt_video",
        "missing": "missing_video",
        "badanswer": "unknown_option",
        "sixopts": "unsupported_item",
        "text-image": "corrupt_image",
        "no-image": "missing_image",
        "nan-start": "bad_time_range",
        "past-end": "no_frames",
    }
    for (item, _), record in records.items():
        assert record["error"] == expect.get(item), (item, record["detail"])
        assert (record["detail"] is None) == (item not in expect)
    for row in metrics["settings"]:
        assert sum(row["errors"].values()) == len(expect)
        assert row["answered"] == 3 and row["scored"] == 3
        assert row["accuracy_all"] == pytest.approx(row["correct"] / (len(rows) - 1))  # one has no truth


@needs_toy
def test_baseline_counts_the_visual_tokens_the_methods_count(tmp_path):
    lines = toy.data_path().read_text().splitlines()
    picked = [line for line in lines if '"image"' in line][:2] + [line for line in lines if '"video"' in line][:2]
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(picked) + "\n")
    methods = ["random", "fastv", "visionzip"]  # one method per stage: pre_llm, llm, vision
    root = str(toy.data_path().parent)  # media paths in the annotations are relative to it
    config = _config(tmp_path, dataset="jsonl", data=str(data), video_root=root, limit=None, methods=methods)
    metrics = run_eval(config)
    rows = read_lines(config.run_dir())
    assert len(rows) == 4 * 4 and all(r["error"] is None for r in rows)
    for item in {r["id"] for r in rows}:
        mine = {r["method"]: r for r in rows if r["id"] == item}
        base = mine.pop("none")
        assert base["tokens_out"] == base["tokens_in"]
        assert {m: r["tokens_in"] for m, r in mine.items()} == {m: base["tokens_in"] for m in methods}, item
    tokens_in = {row["method"]: row["tokens_in"] for row in metrics["settings"]}
    assert len(set(tokens_in.values())) == 1, tokens_in


@needs_toy
def test_each_video_is_encoded_once_per_batch(tmp_path):
    import torch

    from tokreduce.eval.encode_once import encode_each_video_once

    model, _ = toy.load()
    inner = model.model
    x = torch.randn(2, 3, 3, 96, 96)
    batch = torch.stack([x[0], x[1], x[0], x[0]])
    frames = []
    handle = inner.vision_tower.register_forward_pre_hook(
        lambda m, args, kwargs: frames.append((args or [kwargs.get("pixel_values")])[0].shape[0]), with_kwargs=True
    )
    kw = dict(vision_feature_layer=-1, vision_feature_select_strategy="full")
    with torch.no_grad():
        plain = inner.get_video_features(batch, **kw)
        with encode_each_video_once(model):
            once = inner.get_video_features(batch, **kw)
    handle.remove()
    assert frames == [12, 6] and "get_video_features" not in vars(inner)
    torch.testing.assert_close(once.pooler_output, plain.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(once.last_hidden_state, plain.last_hidden_state, atol=1e-5, rtol=1e-5)

    video = str(TOY_VIDEOS / "vid-00000.mp4")
    questions = [
        ("move", ["left", "right", "up", "down"], "B"),
        ("first", ["circle", "square"], "A"),
        ("colour", ["red", "blue", "green"], "C"),
    ]
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": q, "video": video, "question": q + " ?", "options": o, "answer": a}) + "\n"
            for q, o, a in questions
        )
    )
    runs = [
        _config(tmp_path / str(flag), dataset="jsonl", data=str(data), limit=None, batch_size=3, encode_once=flag)
        for flag in (True, False)
    ]
    for config in runs:
        run_eval(config)
    rows = [read_lines(config.run_dir()) for config in runs]
    assert [[r[k] for k in FIELDS] for r in rows[0]] == [[r[k] for k in FIELDS] for r in rows[1]]


@needs_toy
def test_sigkill_mid_run_then_rerun_loses_and_duplicates_nothing(tmp_path):
    args = cli_args(
        "--methods",
        "random",
        "uniform",
        "--keep",
        "0.5",
        "--limit",
        "40",
        "--batch-size",
        "1",
        "--max-new-tokens",
        "2",
        "--output",
        str(tmp_path),
        "--run-name",
        "run",
        "--no-progress",
        "--no-plots",
        "--threads",
        "1",
    )
    predictions = tmp_path / "run" / rec.MAIN
    proc = subprocess.Popen(args, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if predictions.exists() and predictions.read_bytes().count(b"\n") >= 10:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = rec.read_records(predictions)
    assert 10 <= len(done) < 120
    with open(predictions, "a") as f:
        f.write('{"id": "vid-000')  # as if the kill had landed inside a write
    result = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_lines(tmp_path / "run")
    keys = [(r["id"], r["setting"]) for r in rows]
    assert len(keys) == len(set(keys)) == 40 * 3
    first_run = {(r["id"], r["setting"]): r for r in done}
    assert all(first_run[(r["id"], r["setting"])] == r for r in rows if (r["id"], r["setting"]) in first_run)
    assert "| uniform | 0.5 | 40 |" in result.stdout


@needs_toy
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_gloo_processes_equal_one(tmp_path, launcher):
    common = ["-m", "tokreduce.cli", "eval", "--methods", "random", "--keep", "0.5", "--limit", "7", "--batch-size", "2",
              "--max-new-tokens", "2", "--device", "cpu", "--no-progress", "--no-plots", "--threads", "1"]  # fmt: skip
    two = subprocess.run(
        launch_command(launcher) + common + ["--output", str(tmp_path / "two")],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    run_eval(_config(tmp_path / "one", limit=7, batch_size=2, device="cpu"))
    (two_dir,) = (tmp_path / "two").iterdir()
    (one_dir,) = (tmp_path / "one").iterdir()
    assert sorted(p.name for p in two_dir.glob("predictions*")) == [rec.MAIN]  # rank files merged away
    rows1, rows2 = read_lines(one_dir), read_lines(two_dir)
    assert {r["rank"] for r in rows2} == {0, 1}
    assert [[r[k] for k in FIELDS] for r in rows1] == [[r[k] for k in FIELDS] for r in rows2]
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one_dir, two_dir))
    for a, b in zip(m1["settings"], m2["settings"], strict=True):
        assert {
            k: a[k] for k in ("n", "correct", "accuracy", "errors", "tokens_in", "tokens_out", "prefill_gflops")
        } == {k: b[k] for k in ("n", "correct", "accuracy", "errors", "tokens_in", "tokens_out", "prefill_gflops")}
