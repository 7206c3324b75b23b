"""Images/s of timm ViT-B/16 and open_clip ViT-B-32 with and without ToMe (or FlowCut), on CPU in bf16.

Two precisions: ``autocast`` (fp32 weights under ``torch.autocast("cpu", torch.bfloat16)``) and ``bf16``
(weights and images cast to bfloat16). Under CPU autocast, ``nn.MultiheadAttention`` (open_clip's default
block) runs its input projection as a bmm against a weight expanded over the sequence, about 10x slower
than the fp32 model (a PyTorch slow path, not ours); the ToMe path computes q/k/v with ``F.linear`` and
avoids it, so for open_clip only the ``bf16`` rows measure what ToMe itself buys.

Random weights (nothing is downloaded): throughput does not depend on the weights, only the token counts
do, and those follow the r schedule. Baseline and ToMe runs are interleaved round by round and the best
round is kept, so that load from other processes on a shared machine hits both alike. Besides the measured
speed-up the table shows the ideal one from the analytic FLOPs of the token counts, and the ToMe paper's.

    python scripts/bench_vit.py                # batch 16, 3 timed rounds: a few minutes on 2 cores
    python scripts/bench_vit.py --quick        # batch 4, 2 rounds, r=16 only
    python scripts/bench_vit.py --threads 1    # steadier numbers when other processes share the cores
    python scripts/bench_vit.py --models clip_l336 --flowcut 192 128 64 --r --precision bf16
                                               # FlowCut at LLaVA-1.5's tower geometry (576 patches + CLS)

FlowCut rows give the kept patches as ``keep`` and, besides the speed-up, the share of the time spent in its
selection (scores and pruning, ``state.stats.seconds``). FlowCut's schedule depends on the weights: random
weights give a flat CLS attention (entropy ratio near 1), so it prunes almost nothing before the last step;
``--peak F`` multiplies the q and k projections of a timm model by F (logits by F^2) to emulate the
concentrated CLS attention of a trained tower (F=4 prunes 577 -> 516 -> ... -> 167 -> 129 tokens at keep 128).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

import tokreduce

# ToMe paper (Bolya et al., arXiv 2210.09461): off-the-shelf ViT-B/16 at r=16 runs at roughly 2x the
# throughput of the unmerged model on a GPU. No off-the-shelf ViT-B/32 CLIP figure is reported.
PAPER = {("timm vit_base_patch16_224", 16): "~2x (GPU)"}


def build(name: str):
    """(label, model, forward, image size) for a benchmark model with random weights."""
    if name == "timm":
        import timm

        model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
        return "timm vit_base_patch16_224", model, model, 224
    if name == "open_clip":
        import open_clip

        model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
        return "open_clip ViT-B-32", model, model.encode_image, 224
    if name == "clip_l336":  # CLIP ViT-L/14 at 336 px, the LLaVA-1.5 tower's geometry: 576 patches + CLS, 24 blocks
        import timm

        model = timm.create_model("vit_large_patch14_clip_336", pretrained=False).eval()
        return "timm vit_large_patch14_clip_336", model, model, 336
    raise ValueError(f"model must be 'timm', 'open_clip' or 'clip_l336', got {name!r}")


def seconds_per_batch(model, forward, images, reducer) -> tuple[float, float]:
    """Wall-clock seconds of one forward of ``images`` with ``reducer`` attached (None: the plain model), and
    the seconds the reducer reports for its own selection."""
    if reducer is None:
        start = time.perf_counter()
        forward(images)
        return time.perf_counter() - start, 0.0
    with reducer(model) as state:
        start = time.perf_counter()
        forward(images)
        return time.perf_counter() - start, state.stats.seconds


def token_counts(model, forward, images, reducer) -> list[int]:
    with reducer(model) as state:
        forward(images[:1])
    return state.extra["tokens_per_layer"]


def block_flops(n_in: int, n_out: int, width: int) -> float:
    """Multiply-adds of one ViT block: qkv + proj on n_in tokens, attention n_in^2, MLP (4x) on n_out tokens."""
    return 4 * n_in * width**2 + 2 * n_in**2 * width + 8 * n_out * width**2


def ideal_speedup(n: int, counts: list[int], width: int, after_block: bool = False) -> float:
    """Analytic speed-up of the blocks; ``after_block``: tokens leave after the MLP (pruning), not before it."""
    base = len(counts) * block_flops(n, n, width)
    ins = [n] + counts[:-1]
    merged = sum(block_flops(a, a if after_block else b, width) for a, b in zip(ins, counts, strict=True))
    return base / merged


def bench_model(
    name: str, precision: str, rs: list[int], batch: int, rounds: int, keeps: list[int] = (), peak: float = 1.0
) -> list[tuple]:
    """Table rows for one model at one precision: the baseline, then one row per r, then one per FlowCut keep."""
    label, model, forward, size = build(name)
    if peak != 1.0:
        if not hasattr(model, "blocks"):
            raise ValueError("--peak needs a timm model")
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.weight[: 2 * model.embed_dim].mul_(peak)
        label += f" (q, k x{peak:g})"
    images = torch.randn(batch, 3, size, size)
    if precision == "bf16":
        model, images = model.to(torch.bfloat16), images.to(torch.bfloat16)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast" else contextlib.nullcontext()
    # precision "fp32": the model as built
    configs = [(f"r={r}", tokreduce.ToMe(r=r)) for r in rs] + [(f"keep={k}", tokreduce.FlowCut(keep=k)) for k in keeps]
    configs = [("-", None), *configs]
    with torch.inference_mode(), autocast:
        for _, reducer in configs:  # warm-up: oneDNN picks kernels per shape on first use
            seconds_per_batch(model, forward, images, reducer)
        times = [[] for _ in configs]
        for _ in range(rounds):
            for i, (_, reducer) in enumerate(configs):
                times[i].append(seconds_per_batch(model, forward, images, reducer))
        counts = [token_counts(model, forward, images, reducer or tokreduce.ToMe(r=0)) for _, reducer in configs]
    # Best round: on a shared machine other processes only ever add time.
    base = min(t for t, _ in times[0])
    n = counts[0][0]
    width = model.embed_dim if hasattr(model, "embed_dim") else model.visual.transformer.width
    rows = [(label, precision, "-", n, batch / base, 1.0, 1.0, "", "")]
    for (setting, _), t, count in zip(configs[1:], times[1:], counts[1:], strict=True):
        seconds, selecting = min(t)
        ideal = ideal_speedup(n, count, width, after_block=setting.startswith("keep="))
        paper = PAPER.get((label, int(setting[2:])), "") if setting.startswith("r=") else ""
        share = f"{selecting / seconds:.1%}" if setting.startswith("keep=") else ""
        rows.append((label, precision, setting, count[-1], batch / seconds, base / seconds, ideal, share, paper))
    print(f"done {label} ({precision}): {n} tokens, batch {batch}, {rounds} rounds", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 4, 2 rounds, r=16 only")
    parser.add_argument(
        "--models", nargs="+", default=["timm", "open_clip"], choices=["timm", "open_clip", "clip_l336"]
    )
    parser.add_argument("--r", nargs="*", type=int, default=None, help="ToMe r values (default 8 13 16; none: --r)")
    parser.add_argument("--flowcut", nargs="*", type=int, default=[], help="FlowCut keep counts (default none)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 16, quick 4)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3, quick 2)")
    parser.add_argument("--precision", nargs="+", default=["autocast", "bf16"], choices=["autocast", "bf16", "fp32"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--peak", type=float, default=1.0, help="scale the q / k projections (timm models)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rs = args.r if args.r is not None else ([16] if args.quick else [8, 13, 16])
    batch = args.batch or (4 if args.quick else 16)
    rounds = args.rounds or (2 if args.quick else 3)
    torch.manual_seed(0)

    rows = []
    for name in args.models:
        for precision in args.precision:
            rows += bench_model(name, precision, rs, batch, rounds, args.flowcut, args.peak)

    print(f"\nCPU, {torch.get_num_threads()} threads, batch {batch}, best of {rounds} rounds\n")
    print(
        "| model | precision | setting | tokens after last block | images/s | speed-up | ideal (FLOPs) "
        "| selection share | ToMe paper |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, precision, setting, tokens, ips, speedup, ideal, share, paper in rows:
        print(
            f"| {label} | {precision} | {setting} | {tokens} | {ips:.1f} | {speedup:.2f}x | {ideal:.2f}x | {share} "
            f"| {paper} |"
        )


if __name__ == "__main__":
    main()
