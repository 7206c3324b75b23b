"""Train the tokreduce toy model: a tiny LLaVA-OneVision that answers shapes questions on images and videos.

The model is a real `LlavaOnevisionForConditionalGeneration` built from a config (SigLIP vision tower,
Qwen2 language model) and trained from scratch on CPU with data drawn on the fly from
scripts/make_toy_data.py. Tricks that make such a small model learn in under an hour:

- objects sit in the cells of a 6x6 grid that match the 16 px patches, so one object = one token;
- an auxiliary linear head on the vision features the projector reads predicts each patch cell's
  colour + shape + quadrant (or "empty"); it is dropped after training;
- WordAlignment: each object's projected token is scored against the LM embeddings of its colour,
  shape and quadrant words, so question words and image tokens live in one space;
- the chat template puts the question before the image, and NamedObjectProbe (a linear probe on the
  LM hidden state after two layers, dropped after training) teaches every image token to flag
  whether it shows the object the question names. Without the last two the model read the colour of
  *an* object but not of the named one (2 objects: 50 %) after 2,000 steps; with them "where" and
  "is there" questions passed 78 % / 86 % within 500 steps;
- a HF-style model with the LM re-initialised at std 0.1 (see build_model) and RoPE base 1e6;
- an adaptive curriculum (STAGES): one object and position questions only at first, then one more
  question category, then one more object per stage, advancing when the training accuracy passes
  85 %, with a floor that reaches the full task by 70 % of the run. Mixing all categories from the
  start left the model at chance for 400+ steps; a single category is learnt in ~100.

The result is saved with `save_pretrained` (safetensors) plus its processor (word-level tokenizer
with a chat template, image and video processors), so `AutoModelForImageTextToText` and
`AutoProcessor` load it offline from the output folder.

Usage:
    python scripts/train_toy.py --steps 20 --out outputs/toy_smoke          # pipeline check
    # The shipped checkpoint, in two phases (2 CPU threads, about 19 + 50 minutes). Phase 1 ran with a
    # 4224-step schedule and was stopped at its step-1800 save; phase 2 continues on 3-7 objects.
    # A run is bit-for-bit repeatable on one machine; the shipped phase 1 was started with --minutes by
    # an earlier revision whose step timing drew 3 batches from the training stream, so these commands
    # give an equivalent checkpoint, not the identical one.
    python scripts/train_toy.py --steps 4224 --stop-after 1800 --threads 2 --eval-every 200 \
        --image-batch 48 --video-batch 12 --out outputs/toy_phase1
    python scripts/train_toy.py --init-from outputs/toy_phase1 --start-stage 6 --lr 1e-3 --steps 4733 \
        --threads 2 --eval-every 250 --image-batch 48 --video-batch 12 --out tokreduce/toy/checkpoint
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import make_toy_data as D  # noqa: E402

import tokreduce.toy as toy  # noqa: E402

SPECIAL = ["<pad>", "<unk>", "<eos>", "<image>", "<video>"]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- ' ' + message['role'] + ' :' -}}"
    "{%- if message['content'] is string -%}{{- ' ' + message['content'] -}}"
    "{%- else -%}"
    "{%- for c in message['content'] -%}{%- if c['type'] == 'text' -%}{{- ' ' + c['text'] -}}{%- endif -%}{%- endfor -%}"
    "{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{- ' <image>' -}}"
    "{%- elif c['type'] == 'video' -%}{{- ' <video>' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- ' <eos>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' assistant :' -}}{%- endif -%}"
)


def vocabulary() -> list[str]:
    """Every word the data and the prompt format can produce (specials first, deterministic order)."""
    words = "user assistant : ? what colour is the shape object there a where how many are which way does move appears first"
    words = words.split()
    words += list(D.COLOURS) + D.SHAPES + list(D.PLURAL.values()) + " ".join(D.POSITIONS).split()
    words += D.DIRECTIONS + ["yes", "no", "1", "2", "3", "4"] + list(toy.LETTERS)
    return SPECIAL + list(dict.fromkeys(words))


def build_processor():
    """Word-level tokenizer + LLaVA-OneVision image/video processors at 96 px."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        padding_side="left",  # batched generation appends after the prompt
        model_max_length=512,
    )
    # SigLIP-style normalisation; one anyres pinpoint equal to the base size, so an image is the base
    # view plus exactly one identical crop (the layout the model's anyres code expects).
    common = dict(size={"height": 96, "width": 96}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image_processor = LlavaOnevisionImageProcessor(image_grid_pinpoints=[[96, 96]], **common)
    video_processor = LlavaOnevisionVideoProcessor(**common)
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=36,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )


def build_model(
    tokenizer, seed: int, lm_width: int = 128, lm_layers: int = 4, init_std: float = 0.1, rope_theta: float = 1e6
):
    """A ~2M-parameter LlavaOnevisionForConditionalGeneration from a config (random init)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=96,
        patch_size=16,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=lm_width,
        intermediate_size=4 * lm_width,
        num_hidden_layers=lm_layers,
        num_attention_heads=lm_width // 32,
        num_key_value_heads=lm_width // 32,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[96, 96]],
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    # The HF default init (std 0.02) leaves a 128-wide LM on a long plateau where it ignores the image:
    # memorising 4 fixed images took ~80 steps at 0.02 and ~40 at 0.1 (about 1/sqrt(hidden_size)).
    for module in model.model.language_model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, std=init_std)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def user(content: list[dict]) -> dict:
    return {"role": "user", "content": content}


def conversation(kind: str, qas: list[dict]) -> list[dict]:
    """Multi-turn chat: media + first question, answer, next question, answer, ..."""
    msgs = []
    for i, q in enumerate(qas):
        content = ([{"type": kind}] if i == 0 else []) + [{"type": "text", "text": toy.format_prompt(q)}]
        msgs += [user(content), {"role": "assistant", "content": [{"type": "text", "text": q["answer"]}]}]
    return msgs


# Curriculum stages: (question categories, max objects per image).
STAGES = [
    (["position"], 1),
    (["position", "exist"], 1),
    (["position", "exist", "colour"], 1),
    (["position", "exist", "colour", "shape"], 1),
] + [(D.IMAGE_CATEGORIES, n) for n in range(1, 8)]


def sample_image(rng: random.Random, max_objects: int, max_questions: int, categories: list[str] | None = None):
    """One image with 1..max_questions questions from `categories`; the scene fits the first question."""
    categories = categories or D.IMAGE_CATEGORIES
    cat = rng.choice(categories)
    n = rng.randint(1, max_objects)
    img, objs, q = D.image_item(rng, cat, n_objects=n)
    others = [o for o in D.image_questions(rng, objs) if o["category"] != cat and o["category"] in categories]
    rng.shuffle(others)
    return img, D.cell_labels(objs), [q] + others[: max_questions - 1]


def sample_video(rng: random.Random, max_distractors: int = 2):
    """One video with its question; aux labels per frame, shape (T, 36)."""
    frames, per_frame, q = D.video_item(rng, rng.choice(D.VIDEO_CATEGORIES), max_distractors)
    return frames, np.stack([D.cell_labels(f) for f in per_frame]), [q]


def collate(processor, kind: str, samples: list) -> tuple[dict, torch.Tensor, torch.Tensor, list]:
    """Processor inputs with labels on the answer tokens only.

    Returns:
        (inputs incl. labels (B, L), aux labels (N_views, 36), answer positions per sample, questions).
    """
    tok = processor.tokenizer
    texts = [processor.apply_chat_template(conversation(kind, qas), tokenize=False) for _, _, qas in samples]
    media = [m for m, _, _ in samples]
    key = "images" if kind == "image" else "videos"
    inputs = processor(text=texts, padding=True, return_tensors="pt", **{key: media})
    ids = inputs["input_ids"]
    colon, asst = tok.convert_tokens_to_ids(":"), tok.convert_tokens_to_ids("assistant")
    # The answer letter is the token right after "assistant :"; its <eos> follows it.
    is_answer = torch.zeros_like(ids, dtype=torch.bool)
    is_answer[:, 2:] = (ids[:, 1:-1] == colon) & (ids[:, :-2] == asst)
    labels = torch.full_like(ids, -100)
    labels[is_answer] = ids[is_answer]
    is_eos = torch.zeros_like(is_answer)
    is_eos[:, 1:] = is_answer[:, :-1]
    labels[is_eos] = ids[is_eos]
    inputs["labels"] = labels
    if kind == "image":
        # pixel_values is (B, 2, 3, 96, 96): base view + one crop, both show the whole image.
        aux = torch.from_numpy(np.stack([lab for _, lab, _ in samples])).repeat_interleave(2, dim=0)
    else:
        aux = torch.from_numpy(np.concatenate([lab for _, lab, _ in samples]))
    return dict(inputs), aux, is_answer, [qas for _, _, qas in samples]


class VisionCapture:
    """Forward hooks keeping the vision-tower hidden state the projector reads and the projector output."""

    def __init__(self, model):
        self.features = self.projected = None
        self.handles = [
            model.model.vision_tower.register_forward_hook(self.tower_hook),
            model.model.multi_modal_projector.register_forward_hook(self.projector_hook),
        ]

    def tower_hook(self, module, args, output):
        self.features = output.hidden_states[-1]  # (N_views, 36, C)

    def projector_hook(self, module, args, output):
        self.projected = output  # (N_views, 36, H): per-frame, before video pooling

    def remove(self):
        for h in self.handles:
            h.remove()


class WordAlignment:
    """Auxiliary loss that ties each object's projected token to the LM embeddings of its words.

    A projected vision token holding a red circle in the top-left quadrant is scored against the
    input embeddings of {red, green, blue, yellow}, {circle, ...}, {top, bottom} and {left, right};
    cross-entropy on each group. Question words and image tokens then share one space, so comparing
    them is a dot product. On its own it did not make the model pick out the named object (about
    500 steps: colour and shape near 0.5); NamedObjectProbe did.
    """

    def __init__(self, tokenizer):
        groups = [list(D.COLOURS), D.SHAPES, ["top", "bottom"], ["left", "right"]]
        self.groups = [torch.tensor(tokenizer.convert_tokens_to_ids(g)) for g in groups]

    def loss(self, model, projected: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """projected (N, 36, H), aux cell labels (N, 36) as in make_toy_data.cell_labels."""
        has_obj = aux > 0
        colour, shape, quad = D.decode_labels(aux[has_obj])
        feats, targets = projected[has_obj], [colour, shape, quad // 2, quad % 2]
        emb = model.get_input_embeddings().weight
        return sum(F.cross_entropy(feats @ emb[ids].T, t) for ids, t in zip(self.groups, targets, strict=True))


def named_cells(question: str, labels: np.ndarray) -> np.ndarray:
    """Grid cells holding an object the question names (by colour and/or shape), shape (36,) bool."""
    singular = {p: s for s, p in D.PLURAL.items()}
    words = question.split()
    colour = next((w for w in words if w in D.COLOURS), None)
    shape = next((singular.get(w, w) for w in words if w in D.SHAPES or w in singular), None)
    colours, shapes, _ = D.decode_labels(labels)
    match = labels > 0
    if colour is not None:
        match &= colours == list(D.COLOURS).index(colour)
    if shape is not None:
        match &= shapes == D.SHAPES.index(shape)
    return match


def image_token_targets(batch) -> torch.Tensor:
    """Per image token of the LM sequence: 1 if it shows an object the (first) question names, else 0;
    -1 on the crop's newline tokens. Shape (B, 78), in the LLaVA-OneVision order: 36 base-view
    tokens, then 6 crop rows of 6 tokens + 1 newline."""
    _, aux, _, qas = batch
    rows = []
    for labels, q in zip(aux[::2].numpy(), qas, strict=True):  # aux repeats each image for its 2 views
        named = torch.from_numpy(named_cells(q[0]["question"], labels)).float()
        crop = torch.cat([named.view(D.GRID, D.GRID), torch.full((D.GRID, 1), -1.0)], dim=1).flatten()
        rows.append(torch.cat([named, crop]))
    return torch.stack(rows)


class NamedObjectProbe(torch.nn.Module):
    """Auxiliary loss inside the LM: a linear probe on the hidden state after `layer` decoder layers at
    each image token predicts whether that token shows an object the question names.

    The chat template puts the question before the image, so image tokens can see it; this loss
    teaches them to flag themselves, and the answer position then only has to read the flagged tokens.
    Without it the model never learnt to tell the named object from the others (2 objects: 50 %).
    """

    def __init__(self, hidden_size: int, layer: int):
        super().__init__()
        self.layer = layer
        self.head = torch.nn.Linear(hidden_size, 1)

    def loss(self, out, batch, image_token_id: int) -> torch.Tensor:
        inputs = batch[0]
        targets = image_token_targets(batch)
        hidden = out.hidden_states[self.layer][inputs["input_ids"] == image_token_id].view(*targets.shape, -1)
        logits = self.head(hidden).squeeze(-1)
        keep = targets >= 0
        return F.binary_cross_entropy_with_logits(logits[keep], targets[keep])


def step_loss(model, aux_head, capture, align, probe, batch, a):
    """Answer loss + per-patch aux loss + word alignment (+ named-object probe on images)."""
    inputs, aux, is_answer, _ = batch
    is_image = "pixel_values" in inputs
    out = model(**inputs, output_hidden_states=is_image and a.probe_weight > 0)
    aux_loss = F.cross_entropy(aux_head(capture.features).flatten(0, 1), aux.flatten())
    word_loss = align.loss(model, capture.projected, aux) if a.word_weight else torch.zeros(())
    probe_loss = torch.zeros(())
    if is_image and a.probe_weight > 0:
        probe_loss = probe.loss(out, batch, model.config.image_token_id)
    loss = out.loss + a.aux_weight * aux_loss + a.word_weight * word_loss + a.probe_weight * probe_loss
    return loss, out.loss.item(), aux_loss.item() + word_loss.item() + probe_loss.item(), out.logits


@torch.no_grad()
def train_accuracy(logits: torch.Tensor, batch) -> float:
    """Fraction of answer letters in a training batch that the model already predicts (argmax over A-D)."""
    inputs, _, is_answer, _ = batch
    b, t = is_answer.nonzero(as_tuple=True)
    return (logits[b, t - 1].argmax(-1) == inputs["input_ids"][b, t]).float().mean().item()


@torch.no_grad()
def heldout_accuracy(model, processor, batches) -> dict[str, float]:
    """Option-letter accuracy on fixed held-out batches (first question of each sample counts)."""
    letter_ids = torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(toy.LETTERS)))
    rows: dict[str, list[bool]] = {}
    model.eval()
    for inputs, _, is_answer, qas in batches:
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        for b, q in enumerate(qas):
            pos = int(is_answer[b].nonzero()[0]) - 1  # logits at t-1 predict token t
            n = len(q[0]["options"])
            pred = toy.LETTERS[int(logits[b, pos, letter_ids[:n]].argmax())]
            rows.setdefault(q[0]["category"], []).append(pred == q[0]["answer"])
    model.train()
    return {k: sum(v) / len(v) for k, v in rows.items()}


def save(model, processor, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("tokreduce/toy/checkpoint"))
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from --minutes)")
    p.add_argument(
        "--stop-after", type=int, default=None, help="stop after this many steps; the LR schedule still spans --steps"
    )
    p.add_argument("--minutes", type=float, default=None, help="train for about this long instead of --steps")
    p.add_argument("--image-batch", type=int, default=32)
    p.add_argument("--video-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--questions", type=int, default=1, help="questions per image (later ones follow the image)")
    p.add_argument("--aux-weight", type=float, default=1.0)
    p.add_argument("--probe-weight", type=float, default=1.0, help="weight of the NamedObjectProbe loss")
    p.add_argument("--probe-layer", type=int, default=2, help="decoder layers before the probe reads")
    p.add_argument("--word-weight", type=float, default=1.0, help="weight of the WordAlignment loss")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lm-width", type=int, default=128, help="hidden size of the language model (heads of 32)")
    p.add_argument("--lm-layers", type=int, default=4)
    p.add_argument("--rope-theta", type=float, default=1e6, help="RoPE base of the language model (Qwen2's is 1e6)")
    p.add_argument("--init-std", type=float, default=0.1, help="std of the language model's initial weights")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init-from", type=Path, default=None, help="continue from a saved checkpoint directory")
    p.add_argument("--start-stage", type=int, default=0, help=f"first curriculum stage (0-{len(STAGES) - 1})")
    a = p.parse_args()
    if not 0 <= a.start_stage < len(STAGES):
        raise ValueError(f"--start-stage={a.start_stage} must be in [0, {len(STAGES) - 1}]")
    if (a.steps is None) == (a.minutes is None):
        raise ValueError("pass exactly one of --steps or --minutes")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    if a.init_from is not None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(a.init_from)
        model = AutoModelForImageTextToText.from_pretrained(a.init_from).train()
    else:
        processor = build_processor()
        model = build_model(processor.tokenizer, a.seed, a.lm_width, a.lm_layers, a.init_std, a.rope_theta).train()
    c = model.config.vision_config.hidden_size
    aux_head = torch.nn.Linear(c, D.NUM_AUX_CLASSES)
    capture = VisionCapture(model)
    align = WordAlignment(processor.tokenizer)
    probe = NamedObjectProbe(model.config.text_config.hidden_size, a.probe_layer)
    params = list(model.parameters()) + list(aux_head.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {model.config.model_type}, {n_params / 1e6:.2f}M parameters, vocab {len(processor.tokenizer)}")

    # Fixed held-out samples from their own seed (the shipped test split is evaluated at the end).
    val_rng = random.Random(f"val-{a.seed}")
    val = [collate(processor, "image", [sample_image(val_rng, 7, 1) for _ in range(50)]) for _ in range(4)]
    val += [collate(processor, "video", [sample_video(val_rng) for _ in range(40)]) for _ in range(2)]

    # A continued run draws fresh samples rather than replaying the first run's.
    rng = random.Random(f"train-{a.seed}" if a.init_from is None else f"train-{a.seed}-continued")
    # Time one step to turn --minutes into a step count, so the LR schedule knows its length.
    total = a.steps
    if total is None:
        t0 = time.perf_counter()
        timing_rng = random.Random("timing")  # its own stream: --minutes and --steps then train on the same data
        for _ in range(3):
            b = collate(processor, "image", [sample_image(timing_rng, 7, a.questions) for _ in range(a.image_batch)])
            v = collate(processor, "video", [sample_video(timing_rng) for _ in range(a.video_batch)])
            (step_loss(model, aux_head, capture, align, probe, b, a)[0] * 0).backward()
            (step_loss(model, aux_head, capture, align, probe, v, a)[0] * 0).backward()
        opt.zero_grad(set_to_none=True)
        per_step = (time.perf_counter() - t0) / 3
        total = max(10, int(a.minutes * 60 / (per_step * 1.08)))  # 8 % margin for evaluation
        print(f"{per_step:.2f} s/step -> {total} steps")
    warmup = min(50, total // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return a.lr * (step + 1) / warmup
        return a.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))

    start = time.perf_counter()
    stage, stage_since, ema = a.start_stage, 0, 0.0
    bar = tqdm(range(min(total, a.stop_after or total)), desc="train", unit="step")
    for step in bar:
        # Next stage once this one is learnt (EMA of image training accuracy > 0.85 for a while), and
        # never below a floor that reaches the full task at 70 % of the run.
        floor = min(len(STAGES) - 1, int(len(STAGES) * step / (0.7 * total)))
        if stage < len(STAGES) - 1 and ((ema > 0.85 and step - stage_since >= 20) or stage < floor):
            stage, stage_since = max(stage + 1, floor), step
            tqdm.write(f"step {step}: curriculum stage {stage} {STAGES[stage]}")
        categories, max_objects = STAGES[stage]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ib = collate(
            processor, "image", [sample_image(rng, max_objects, a.questions, categories) for _ in range(a.image_batch)]
        )
        distractors = min(2, max(0, max_objects - 1))
        vb = collate(processor, "video", [sample_video(rng, distractors) for _ in range(a.video_batch)])
        loss_i, lm_i, aux_i, logits_i = step_loss(model, aux_head, capture, align, probe, ib, a)
        loss_v, lm_v, aux_v, _ = step_loss(model, aux_head, capture, align, probe, vb, a)
        ema = 0.9 * ema + 0.1 * train_accuracy(logits_i, ib)
        opt.zero_grad(set_to_none=True)
        (loss_i + loss_v).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(
            lm_img=f"{lm_i:.3f}", lm_vid=f"{lm_v:.3f}", aux=f"{(aux_i + aux_v) / 2:.3f}", acc=f"{ema:.2f}", stage=stage
        )
        if (step + 1) % a.eval_every == 0 or step + 1 == len(bar):
            acc = heldout_accuracy(model, processor, val)
            mins = (time.perf_counter() - start) / 60
            tqdm.write(
                f"step {step + 1} ({mins:.1f} min) held-out: " + " ".join(f"{k}={v:.2f}" for k, v in acc.items())
            )
            save(model, processor, a.out)  # keep the latest weights even if the run is stopped

    capture.remove()
    save(model, processor, a.out)
    print(f"trained {len(bar)} steps in {(time.perf_counter() - start) / 60:.1f} min; saved to {a.out}")

    # Final check through the public loading path on the shipped test split, by greedy generation.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(a.out).eval()
    processor = AutoProcessor.from_pretrained(a.out)
    if toy.data_path().is_file():
        result = toy.evaluate(model, processor, toy.load_items(), mode="generate", progress=True)
        print(toy.format_table(result))


if __name__ == "__main__":
    main()
