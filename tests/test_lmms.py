"""tokreduce as an lmms-eval model: found through lmms-eval's entry points, run through its own CLI, offline.

The tasks in tests/resources/lmms are the toy test split as local lmms-eval tasks (a JSONL file, no
download). The CLI run must score exactly the items ``tokreduce eval`` scores, full and reduced, and
write the efficiency numbers next to lmms-eval's own results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402

from tokreduce import toy  # noqa: E402
from tokreduce.eval import EvalConfig, run_eval  # noqa: E402
from tokreduce.lmms.model import TokReduceLMM  # noqa: E402

TASKS = Path(__file__).parent / "resources" / "lmms"
LIMIT = 10  # first items of each task: 10 images, 10 videos
SETTINGS = {"none@1.0": "method=none", "divprune@0.11": "method=divprune,keep=0.11"}  # tokreduce eval's setting keys
EFFICIENCY = ("visual_tokens_in", "visual_tokens_out", "selection_s", "prefill_flops")


def test_lmms_eval_finds_the_model_through_its_entry_points():
    from lmms_eval.models import MODEL_REGISTRY_V2

    assert MODEL_REGISTRY_V2.get_model_class("tokreduce") is TokReduceLMM


def test_bad_model_args_name_the_fix():
    with pytest.raises(ValueError, match="no knob"):
        TokReduceLMM(method="divprune", keep=0.25, layr=2)
    with pytest.raises(ValueError, match="need a method"):
        TokReduceLMM(keep=0.25)
    with pytest.raises(ValueError, match="batch_size"):
        TokReduceLMM(batch_size="auto")


@pytest.fixture(scope="module")
def lmms_runs(tmp_path_factory) -> dict[str, Path]:
    """One ``lmms-eval`` CLI process, two configurations (full, reduced): setting -> its output folder."""
    tmp = tmp_path_factory.mktemp("lmms")
    config = [
        {
            "model": "tokreduce",
            "model_args": args,
            "tasks": "tokreduce_toy_image,tokreduce_toy_video,tokreduce_toy_mc",
            "include_path": str(TASKS),
            "limit": LIMIT,
            "batch_size": 4,
            "device": "cpu",
            "output_path": str(tmp / setting),
            "log_samples": True,
            "verbosity": "DEBUG",  # lmms-eval only re-raises errors at DEBUG; otherwise a failure exits 0
        }
        for setting, args in SETTINGS.items()
    ]
    (tmp / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp / "hf_datasets"),
    }
    script = Path(sys.executable).with_name("lmms-eval")  # the console script pip installs
    cli = [str(script)] if script.exists() else [sys.executable, "-m", "lmms_eval"]
    done = subprocess.run(
        [*cli, "--config", str(tmp / "config.yaml")], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {setting: tmp / setting for setting in SETTINGS}


def _samples(run: Path, task: str) -> list[dict]:
    (path,) = run.glob(f"*_samples_{task}.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def _results(run: Path) -> dict:
    (path,) = run.glob("*_results.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def tokreduce_eval(tmp_path_factory) -> dict[str, dict[str, bool]]:
    """``tokreduce eval`` on the same items: setting -> {item id: correct}."""
    tmp = tmp_path_factory.mktemp("eval")
    items = toy.load_items(media_type="image", limit=LIMIT) + toy.load_items(media_type="video", limit=LIMIT)
    data = tmp / "items.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in it.items() if k != "root"}) + "\n" for it in items))
    config = EvalConfig(
        dataset="jsonl",
        data=str(data),
        video_root=str(toy.data_path().parent),
        methods=["divprune"],
        keep=[0.11],
        batch_size=4,
        device="cpu",
        output=str(tmp),
        progress=False,
        plots=False,
    )
    run_eval(config)
    records = [json.loads(line) for line in (config.run_dir() / "predictions.jsonl").read_text().splitlines()]
    correct: dict[str, dict[str, bool]] = {}
    for r in records:
        correct.setdefault(r["setting"], {})[r["id"]] = r["correct"]
    return correct


@pytest.mark.slow
def test_cli_scores_what_tokreduce_eval_scores(lmms_runs, tokreduce_eval):
    ids = {
        "tokreduce_toy_image": [it["id"] for it in toy.load_items(media_type="image", limit=LIMIT)],
        "tokreduce_toy_video": [it["id"] for it in toy.load_items(media_type="video", limit=LIMIT)],
    }
    for setting, run in lmms_runs.items():
        results = _results(run)
        for task, task_ids in ids.items():
            samples = sorted(_samples(run, task), key=lambda s: s["doc_id"])
            harness = {task_ids[s["doc_id"]]: bool(s["accuracy"]) for s in samples}
            assert harness == {i: tokreduce_eval[setting][i] for i in task_ids}, (setting, task)
            assert results["results"][task]["accuracy,none"] == pytest.approx(sum(harness.values()) / LIMIT)
    # the reduced run is really reduced, and the comparison is not trivially all-correct
    reduced = tokreduce_eval["divprune@0.11"]
    assert sum(reduced.values()) < sum(tokreduce_eval["none@1.0"].values())


@pytest.mark.slow
def test_efficiency_is_written_next_to_the_scores(lmms_runs):
    for setting, run in lmms_runs.items():
        for task in ("tokreduce_toy_image", "tokreduce_toy_video"):
            for sample in _samples(run, task):
                (counts,) = sample["token_counts"]
                assert set(EFFICIENCY) <= set(counts)
                # the toy's reducible tokens: an image's 78 placeholders less 6 newlines, a video's 73 less 1
                assert counts["visual_tokens_in"] == 72 and counts["prefill_flops"] > 0
                if setting == "none@1.0":
                    assert counts["visual_tokens_out"] == counts["visual_tokens_in"] and counts["selection_s"] == 0
                else:
                    assert counts["visual_tokens_out"] == 8  # round(0.11 * 72)
        throughput = _results(run)["throughput"]
        assert {f"avg_{name}" for name in EFFICIENCY} <= set(throughput)
    full, reduced = (_results(lmms_runs[s])["throughput"]["avg_prefill_flops"] for s in SETTINGS)
    assert reduced < full


@pytest.mark.slow
def test_multiple_choice_runs_through_loglikelihood(lmms_runs):
    """A multiple_choice task sends one loglikelihood request per option; the lowest loss is the answer."""
    options = [len(it["options"]) for it in toy.load_items(limit=LIMIT)]
    for run in lmms_runs.values():
        samples = sorted(_samples(run, "tokreduce_toy_mc"), key=lambda s: s["doc_id"])
        assert [len(s["filtered_resps"]) for s in samples] == options
        assert 0 <= _results(run)["results"]["tokreduce_toy_mc"]["acc,none"] <= 1


def _requests(lm: TokReduceLMM, items: list[dict]) -> list[Instance]:
    """lmms-eval loglikelihood requests (context, continuation, doc_to_visual, doc_id, task, split)."""
    lm.task_dict = {"toy": {"test": items}}
    return [
        Instance(
            request_type="loglikelihood",
            arguments=(toy.format_prompt(it), it["answer"], lambda doc: [toy.load_media(doc)], i, "toy", "test"),
            idx=0,
            metadata={"task": "toy", "doc_id": i, "repeats": 1},
        )
        for i, it in enumerate(items)
    ]


def _labelled_loss(model, processor, item: dict) -> float:
    """One unpadded forward of prompt + answer with the prompt masked out of the labels."""
    kind, media = item["media_type"], [toy.load_media(item)]
    user = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": toy.format_prompt(item)}]}]
    answered = [*user, {"role": "assistant", "content": [{"type": "text", "text": item["answer"]}]}]
    prompt = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(answered, tokenize=False)
    inputs = processor(text=[full], return_tensors="pt", **{f"{kind}s": media})
    prompt_len = processor(text=[prompt], return_tensors="pt", **{f"{kind}s": media})["input_ids"].shape[1]
    labels = inputs["input_ids"].clone()
    labels[:, :prompt_len] = -100
    with torch.no_grad():
        return float(model(**inputs, labels=labels).loss)


def test_loglikelihood_is_the_plain_models_loss_on_the_answer():
    """Batched, left padded, through the chat template: the mean NLL of the answer tokens (lmms-eval's HF
    models' convention), equal to a labelled forward of each item alone."""
    lm = TokReduceLMM(batch_size=3)
    items = toy.load_items(media_type="image", limit=3) + toy.load_items(media_type="video", limit=2)
    results = [getattr(r, "text", r) for r in lm.loglikelihood(_requests(lm, items))]
    model, processor = toy.load()
    for item, (loss, greedy) in zip(items, results, strict=True):
        assert loss == pytest.approx(_labelled_loss(model, processor, item), rel=1e-4, abs=1e-5)
        assert greedy == (toy.predict(model, processor, item) == item["answer"])
