"""Evaluate a toy-format checkpoint on the shipped shapes test split (or any annotations JSONL).

Loads the checkpoint through the public Hugging Face path (`AutoModelForImageTextToText` /
`AutoProcessor`), answers every item by greedy generation (or by option-letter logits) and prints
accuracy per category, per media type and overall.

Usage:
    python scripts/eval_toy.py                                  # bundled checkpoint, shipped test split
    python scripts/eval_toy.py --checkpoint outputs/toy_long --mode logits --json outputs/toy_eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tokreduce.toy as toy  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="model directory (default: the bundled toy)")
    p.add_argument("--data", type=Path, default=None, help="annotations JSONL (default: the shipped test split)")
    p.add_argument("--mode", choices=["generate", "logits"], default="generate")
    p.add_argument("--media-type", choices=["image", "video"], default=None)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    ckpt = a.checkpoint or toy.path()
    if not (ckpt / "config.json").is_file():
        raise SystemExit(f"no checkpoint at {ckpt} (expected config.json); train one with scripts/train_toy.py")
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    processor = AutoProcessor.from_pretrained(ckpt)
    items = toy.load_items(a.data, media_type=a.media_type, limit=a.limit)
    t0 = time.perf_counter()
    result = toy.evaluate(model, processor, items, mode=a.mode, progress=True)
    print(toy.format_table(result))
    print(f"{len(items)} items in {time.perf_counter() - t0:.1f} s ({a.mode})")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
