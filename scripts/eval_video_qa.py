"""Batch video-QA evaluation; the same as ``tokreduce eval`` (see ``tokreduce eval --help``).

Usage:
    python scripts/eval_video_qa.py                                   # toy model on the toy video QA
    python scripts/eval_video_qa.py --config scripts/eval_config.yaml --limit 20
    torchrun --nproc_per_node=2 scripts/eval_video_qa.py --methods divprune --keep 0.25
"""

import sys

from tokreduce.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
