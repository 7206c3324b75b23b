"""`tokreduce bench --quick` runs end to end on tiny models and prints a table with every column (no timings)."""

import json

import pytest

from tokreduce.eval.bench import COLUMNS, main
from tokreduce.eval.bench_models import build_model, cache_layer_bytes, make_prompt, prefill


def test_quick_bench_on_tiny_models_prints_every_column(tmp_path, capsys):
    code = main(
        [
            "--quick",
            "--models",
            "tiny-qwen2-vl,tiny-llava-ov",
            "--methods",
            "random,fastv",
            "--repeats",
            "1",
            "--decode-tokens",
            "2",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| model"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(COLUMNS)
    rows = [line for line in out.splitlines() if line.startswith("| tiny-")]
    assert len(rows) == 4 and all(len(r.strip("|").split("|")) == len(COLUMNS) for r in rows)
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert (tmp_path / "bench.md").read_text().count("| tiny-") == 4
    records = json.loads((tmp_path / "bench.json").read_text())
    for r in records:  # invariants, not timings: the measured cache holds exactly the ideal tokens per layer
        assert r["kv_layer_error"] == 0.0 and r["kv_bytes"] == r["kv_ideal_bytes"]
        assert r["kept"] == round(0.25 * r["visual"])
        assert 1 < r["roofline"] and r["roofline_full_ms"] > 0  # the calibrated roofline ideal is in every row


def test_a_prune_layer_beyond_the_kept_layers_is_skipped_with_its_knob(tmp_path, capsys):
    args = ["--quick", "--models", "tiny-qwen2-vl", "--methods", "random,holitom", "--repeats", "1"]
    code = main([*args, "--decode-tokens", "2", "--threads", "1", "--out", str(tmp_path)])
    assert code == 0
    captured = capsys.readouterr()
    assert "# skip holitom: holitom: layer must be in [1, 3] for this model, got 18 (pass --knob)" in captured.err
    assert [line.split("|")[3].strip() for line in captured.out.splitlines() if line.startswith("| tiny-")] == [
        "random"
    ]


def test_cache_bytes_follow_layer_k_pruning():
    import tokreduce

    model = build_model("tiny-llava-ov")
    prompt = make_prompt(model, 196 * 2)
    assert (prompt.visual, prompt.grid) == (392, (2, 14, 14))  # 384 px SigLIP: 14 x 14 pooled tokens per frame
    _, full = prefill(model, prompt)
    with tokreduce.FastV(keep=0.25, layer=2)(model):
        _, pruned = prefill(model, prompt)
    assert pruned[:2] == full[:2]
    per_token = full[0] // (prompt.visual + prompt.text)
    assert pruned[2:] == [per_token * (98 + prompt.text)] * 2
    assert cache_layer_bytes(type("C", (), {"layers": []})()) == []


def test_cli_registers_bench_and_rejects_unknown_names(tmp_path, run_cli):
    code, line = run_cli("bench", "--models", "tiny-qwen2-vl", "--methods", "nope", "--out", str(tmp_path))
    assert code == 2 and "unknown method 'nope'" in line
    with pytest.raises(ValueError, match="unknown bench model"):
        build_model("gpt-17")


def test_scaling_on_a_tiny_model_writes_table_json_and_plot(tmp_path, capsys):
    code = main(
        ["--scaling", "--models", "tiny-qwen2-vl", "--tokens", "144,288", "--repeats", "1", "--threads", "1"]
        + ["--out", str(tmp_path)]
    )
    assert code == 0
    from tokreduce.eval.bench_scaling import COLUMNS as SCALING_COLUMNS

    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| model"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(SCALING_COLUMNS)
    records = json.loads((tmp_path / "scaling.json").read_text())
    assert [(r["visual"], r["method"]) for r in records] == [
        (144, "divprune"),
        (144, "fastv"),
        (288, "divprune"),
        (288, "fastv"),
    ]
    assert all(r["kept"] == round(0.25 * r["visual"]) and r["roofline"] > 1 for r in records)
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_peak_memory_sees_an_allocation_inside_the_block():
    import torch

    from tokreduce.eval.bench_scaling import PeakMemory

    with PeakMemory() as peak:
        block = torch.ones(16 * 2**20)  # 64 MiB, touched
    del block
    assert peak.extra >= 60 * 2**20


def test_decode_kv_counts_what_stays_on_the_device():
    """KV bytes after decoding: the reduced cache plus the new tokens; a persistent decode policy that parks its
    dropped entries on the same device (the CPU here) saves no memory there, and the bench must not claim it."""
    from tokreduce.eval.bench import Baseline, bench_cell

    model = build_model("tiny-llava-ov", layers=4)
    prompt = make_prompt(model, 196 * 2)
    base = Baseline(model, prompt, decode_tokens=3)
    per_token_layer = base.layer_bytes[0] // (prompt.visual + prompt.text)
    assert base.decode_kv_bytes == 4 * per_token_layer * (prompt.visual + prompt.text + 2)  # 3 tokens, 2 cached
    row = bench_cell("tiny", model, prompt, base, "random", 0.25, 1, 3)
    assert row.decode_kv_bytes == 4 * per_token_layer * (row.kept + prompt.text + 2)
    masked, parked = (
        bench_cell("tiny", model, prompt, base, "dycoke", 0.5, 1, 3, knobs={"decode_policy": policy})
        for policy in ("reference", "persistent")
    )
    assert parked.method == "dycoke decode_policy=persistent"
    assert parked.decode_kv_bytes == masked.decode_kv_bytes < base.decode_kv_bytes
