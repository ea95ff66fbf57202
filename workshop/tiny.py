"""The offline model: a tiny Qwen3-VL-architecture reranker the project builds and trains itself.

No model hub is reachable here and random weights rank randomly, so this module makes a real
`Qwen3VLForConditionalGeneration` (ViT with deepstack, M-RoPE decoder) small enough for two CPU
cores, with its own byte-level BPE tokenizer (`yes` and `no` single tokens, Qwen special tokens),
image-processor settings and chat template, and trains it on synthetic rerank pairs it
generates: coloured shapes on noisy backgrounds with matching, half-matching and non-matching
captions, as text->image, image->text and text->text pairs. Training is seeded and cached by a
hash of this file and the library versions; `ensure_tiny_model()` returns the folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

SEED = 1234
TINY_MODEL_NAME = "tiny-qwen3-vl-reranker"  # the model id it is served under
IMAGE_SIDE = 96  # 96 px = 6x6 patches of 16 -> 9 merged visual tokens
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
CAPTIONS = ("a {c} {s}", "{c} {s}", "a picture of a {c} {s}", "an image showing a {c} {s}", "the {s} is {c}")
QUERIES = ("{c} {s}", "find a {c} {s}", "show me a {c} {s}", "{s} that is {c}")
HELD_OUT_QUERIES = ("looking for a {c} {s}", "any {c} {s}")
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]

TEXT_CONFIG = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-6, hidden_act="silu",
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5], "mrope_interleaved": True},
)
VISION_CONFIG = dict(
    depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16, spatial_merge_size=2,
    temporal_patch_size=2, out_hidden_size=128, num_position_embeddings=64, deepstack_visual_indexes=[0, 1],
    hidden_act="gelu_pytorch_tanh",
)
# Curriculum, as real VLMs are built. (1) Align the vision tower: each merged visual token is
# regressed onto the decoder's embedding of the image's colour or shape word (deepstack features
# onto zero), so an image first reads like its caption. (2) Short prompts (query and document
# alone): text->text with grades 0/2, where the decoder finds its matching circuit in a few
# hundred steps; then partial matches and image pairs; then everything. (3) The official layout,
# with some short prompts mixed in. Trained on the official layout from the start, a 4-layer
# model sits on a loss plateau for thousands of steps under the ~60-token preamble.
ALIGN_STEPS = 500
TEXT_STEPS = 300
IMAGE_STEPS = 1100
SHORT_STEPS = 1700
TRAIN_STEPS = 2500
SHORT_SHARE_LATER = 0.25
VISION_LR_SCALE = 0.05
BATCH = 32
LR = 2e-3


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str

    def relevance(self, other: Thing) -> int:
        """Graded relevance: 2 same colour and shape, 1 one of them, 0 neither."""
        return int(self.colour == other.colour) + int(self.shape == other.shape)


def cache_root() -> Path:
    return Path(os.environ.get("RERANK_FLEET_CACHE", Path.home() / ".cache" / "rerank-fleet"))


def build_fingerprint() -> str:
    import tokenizers
    import transformers

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(f"{torch.__version__}|{transformers.__version__}|{tokenizers.__version__}".encode())
    return h.hexdigest()[:16]


def resolve_source(source: str) -> str:
    """A model source for `RerankEngine.load`: 'tiny' becomes the built offline model's folder."""
    return str(ensure_tiny_model()) if source == "tiny" else source


def ensure_tiny_model(root: Path | None = None) -> Path:
    """Path of the trained tiny model, building it (a few minutes, once) if not cached."""
    from filelock import FileLock

    root = root or cache_root()
    target = root / f"{TINY_MODEL_NAME}-{build_fingerprint()}"
    if (target / "DONE").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # replicas and test workers may race to build it
        if (target / "DONE").exists():
            return target
        print(f"[tiny model] building and training the offline model once (~5-8 min on 2 cores) into {target}", file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
        try:
            report = build_and_train(tmp)
            (tmp / "training_report.json").write_text(json.dumps(report, indent=2))
            (tmp / "DONE").write_text("ok\n")
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---- synthetic world ------------------------------------------------------------------------


def draw(thing: Thing, rng: random.Random, side: int = IMAGE_SIDE) -> bytes:
    """PNG bytes of one coloured shape on a noisy light background."""
    bg = tuple(rng.randint(200, 250) for _ in range(3))
    img = Image.new("RGB", (side, side), bg)
    d = ImageDraw.Draw(img)
    # Large, nearly centred shapes: at 16-pixel patches a tiny ViT tells them apart by which patches
    # are filled (corners, edges, centre), which it learns in a few hundred steps.
    size = rng.randint(side * 65 // 100, side * 85 // 100)
    x0 = (side - size) // 2 + rng.randint(-side // 16, side // 16)
    y0 = (side - size) // 2 + rng.randint(-side // 16, side // 16)
    box = (x0, y0, x0 + size, y0 + size)
    jitter = [max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[thing.colour]]
    fill = tuple(jitter)
    if thing.shape == "circle":
        d.ellipse(box, fill=fill)
    elif thing.shape == "square":
        d.rectangle(box, fill=fill)
    elif thing.shape == "triangle":
        d.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    else:
        w = size // 3
        d.rectangle((x0 + w, y0, x0 + 2 * w, y0 + size), fill=fill)
        d.rectangle((x0, y0 + w, x0 + size, y0 + 2 * w), fill=fill)
    arr = np.asarray(img, dtype=np.int16) + np.asarray(np.random.default_rng(rng.randint(0, 2**31)).integers(-12, 13, (side, side, 3)), np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def random_thing(rng: random.Random) -> Thing:
    return Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES))


def neighbour(t: Thing, rng: random.Random, relevance: int) -> Thing:
    """A thing with the given relevance to `t`."""
    if relevance == 2:
        return t
    other_c = rng.choice([c for c in COLOURS if c != t.colour])
    other_s = rng.choice([s for s in SHAPES if s != t.shape])
    if relevance == 1:
        return Thing(t.colour, other_s) if rng.random() < 0.5 else Thing(other_c, t.shape)
    return Thing(other_c, other_s)


def caption(t: Thing, rng: random.Random) -> str:
    return rng.choice(CAPTIONS).format(c=t.colour, s=t.shape)


def query_text(t: Thing, rng: random.Random, templates=QUERIES) -> str:
    return rng.choice(templates).format(c=t.colour, s=t.shape)


class ImagePool:
    """Pre-drawn training images per (colour, shape), with their patches: drawing and resizing
    anew every step would cost more than the model's own training step on two cores."""

    def __init__(self, engine, rng: random.Random, per_class: int = 32):
        self.images = {Thing(c, s): [draw(Thing(c, s), rng) for _ in range(per_class)] for c in COLOURS for s in SHAPES}
        self.patches = {id(b): engine.preprocessor.image(b, "image") for bs in self.images.values() for b in bs}
        self.rng = rng

    def sample(self, t: Thing) -> bytes:
        return self.rng.choice(self.images[t])


KINDS = ("text->image", "image->text", "text->text")
TARGETS = {2: 0.98, 1: 0.25, 0: 0.02}  # kept off 0/1 so logits never saturate between curriculum stages


def training_pairs(rng: random.Random, pool: ImagePool | None = None, *, kinds=KINDS, grades=(0, 1, 2)) -> Iterator[tuple]:
    """Endless (query, document, target) of the given pair kinds and relevance grades, uniformly."""
    from engine.inputs import ImageInput, RerankItem

    def image_of(t: Thing) -> ImageInput:
        return ImageInput.of(pool.sample(t) if pool is not None else draw(t, rng))

    while True:
        q = random_thing(rng)
        rel = rng.choice(grades)
        d = neighbour(q, rng, rel)
        kind = rng.choice(kinds)
        if kind == "text->image":
            pair = (RerankItem(text=query_text(q, rng)), RerankItem(images=(image_of(d),)))
        elif kind == "image->text":
            pair = (RerankItem(images=(image_of(q),)), RerankItem(text=caption(d, rng)))
        else:
            pair = (RerankItem(text=query_text(q, rng)), RerankItem(text=caption(d, rng)))
        yield pair[0], pair[1], TARGETS[rel]


def lr_factor(step: int, steps: int) -> float:
    """Warm-up, cosine decay, and half the rate once the full mixture starts: it is
    noisier than the text->text stage, and at the full rate its loss settles visibly higher."""
    warm = min(1.0, (step + 1) / 50)
    cosine = 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    return warm * cosine * (0.5 if step >= IMAGE_STEPS else 1.0)


def curriculum(step: int, rng: random.Random) -> tuple[str, bool]:
    """(stream name, short prompt?) for a training step; see the comment on the step constants."""
    if step < TEXT_STEPS:
        return "text02", True
    if step < IMAGE_STEPS:
        return rng.choice(("text012", "image02")), True
    if step < SHORT_STEPS:
        return "all", True
    return "all", rng.random() < SHORT_SHARE_LATER


def eval_set(seed: int = 99, n_queries: int = 24, n_docs: int = 20, *, templates=HELD_OUT_QUERIES):
    """Held-out ranking tasks: a text query and `n_docs` candidates (images and captions) with graded
    relevance. New images, new query phrasings. Returns [(query_item, [doc_items], [gains])]."""
    from engine.inputs import ImageInput, RerankItem

    rng = random.Random(seed)
    tasks = []
    for _ in range(n_queries):
        q = random_thing(rng)
        docs, gains = [], []
        for j in range(n_docs):
            rel = 2 if j < 3 else 1 if j < 9 else 0
            d = neighbour(q, rng, rel)
            docs.append(RerankItem(images=(ImageInput.of(draw(d, rng)),)) if rng.random() < 0.6 else RerankItem(text=caption(d, rng)))
            gains.append(float(rel))
        order = list(range(n_docs))
        rng.shuffle(order)
        tasks.append((RerankItem(text=query_text(q, rng, templates)), [docs[i] for i in order], [gains[i] for i in order]))
    return tasks


# ---- building -------------------------------------------------------------------------------


def build_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from engine.prompt import DEFAULT_INSTRUCTION, QWEN3_VL_CHAT_TEMPLATE, SYSTEM_PROMPT

    rng = random.Random(SEED)
    corpus = [SYSTEM_PROMPT, DEFAULT_INSTRUCTION, "<Instruct>: <Query>: <Document>: NULL", "yes", "no"] * 50
    for _ in range(3000):
        t = random_thing(rng)
        corpus += [caption(t, rng), query_text(t, rng), query_text(t, rng, HELD_OUT_QUERIES)]
    corpus += ["The quick brown fox jumps over the lazy dog. 0123456789 seconds"] * 20
    tok = Tokenizer(models.BPE())
    # Words split on whitespace and punctuation before byte-level BPE, so "red" is one token wherever
    # it stands (start of a side or after a space): the tiny model learns matching far faster.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = QWEN3_VL_CHAT_TEMPLATE
    fast.padding_side = "left"
    fast.save_pretrained(folder)
    for w in ("yes", "no"):
        if len(fast(w, add_special_tokens=False)["input_ids"]) != 1:
            raise RuntimeError(f"tiny tokenizer splits {w!r}")


def build_model(folder: Path, seed: int = SEED):
    """Write tokenizer, configs and a randomly initialised model into `folder`; return the model."""
    from transformers import AutoTokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    build_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    cfg = Qwen3VLConfig(
        text_config=dict(TEXT_CONFIG, vocab_size=len(tok), pad_token_id=ids["<|endoftext|>"]),
        vision_config=VISION_CONFIG,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(cfg).float()
    write_preprocessor_config(folder)
    return model


def write_preprocessor_config(folder: Path) -> None:
    """Qwen3-VL's image-processor settings (patch 16, merge 2, the reranker's pixel limits)."""
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                "size": {"shortest_edge": 4 * 32 * 32, "longest_edge": 1800 * 32 * 32},
            },
            indent=2,
        )
    )


def build_and_train(folder: Path, steps: int = TRAIN_STEPS) -> dict:
    from transformers import AutoTokenizer

    from engine.config import EngineConfig
    from engine.engine import RerankEngine
    from engine.model import LoadedModel

    t0 = time.time()
    torch.manual_seed(SEED)
    model = build_model(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    loaded = LoadedModel(model, folder, str(folder), "qwen3-vl", "fp32", torch.device("cpu"), torch.float32)
    engine = RerankEngine(loaded, tok, EngineConfig(max_image_bytes=1 << 20, max_image_pixels=1 << 20), model_id="tiny")
    rng = random.Random(SEED)
    pool = ImagePool(engine, random.Random(SEED + 2))
    streams = {
        "text02": training_pairs(rng, pool, kinds=("text->text",), grades=(0, 2)),
        "text012": training_pairs(rng, pool, kinds=("text->text",)),
        "image02": training_pairs(rng, pool, kinds=("text->image", "image->text"), grades=(0, 2)),
        "all": training_pairs(rng, pool),
    }
    # The aligned vision tower moves slowly from here on: at the decoder's learning rate the first
    # image batches' large gradients wash its alignment out before the decoder can use it.
    visual_params = set(map(id, model.model.visual.parameters()))
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if id(p) not in visual_params]},
            {"params": list(model.model.visual.parameters()), "lr": LR * VISION_LR_SCALE},
        ],
        lr=LR,
        weight_decay=0.01,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
    model.train()
    align_report = align_vision(model, pool, random.Random(SEED + 1), engine.tokenizer, t0=t0)
    losses = []
    for step in range(steps):
        name, short = curriculum(step, rng)
        batch, targets = training_batch(engine, [next(streams[name]) for _ in range(BATCH)], short=short, patch_cache=pool.patches)
        logits = model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1]
        margin = logits[:, engine.yes_id] - logits[:, engine.no_id]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(margin, targets)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 99:
            progress(ALIGN_STEPS + step + 1, t0, f"training, loss {float(np.mean(losses[-100:])):.3f}")
    model.eval()
    model.save_pretrained(folder)
    engine = RerankEngine.load(str(folder), "fp32", device="cpu")
    ndcg = evaluate_ndcg(engine)
    return {
        "align_steps": ALIGN_STEPS, **align_report, "steps": steps, "text_steps": TEXT_STEPS, "image_steps": IMAGE_STEPS, "short_steps": SHORT_STEPS,
        "final_loss": float(np.mean(losses[-50:])), "heldout_ndcg@10": ndcg, "seconds": round(time.time() - t0, 1),
    }


def progress(done: int, t0: float, what: str, total: int = ALIGN_STEPS + TRAIN_STEPS) -> None:
    """One line per 100 steps on stderr with the time left: the build takes minutes, once."""
    elapsed = time.time() - t0
    left = elapsed / done * (total - done)
    print(f"[tiny model] step {done}/{total} ({100 * done // total}%), {what}, {elapsed:.0f} s elapsed, ~{left / 60:.1f} min left",
          file=sys.stderr, flush=True)  # fmt: skip


def align_vision(model, pool: ImagePool, rng: random.Random, tokenizer, steps: int = ALIGN_STEPS, batch: int = 48, *, t0: float) -> dict:
    """Stage 1: regress the merged visual tokens onto the (frozen) decoder embeddings of the image's
    words — even tokens onto the colour word, odd onto the shape word — and the deepstack features
    onto zero. Reports how often the nearest colour/shape word of the mean token is right."""
    word = {w: tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (*COLOURS, *SHAPES)}
    table = model.model.language_model.embed_tokens.weight.detach()
    colours, shapes = table[[word[c] for c in COLOURS]], table[[word[s] for s in SHAPES]]
    visual = model.model.visual
    opt = torch.optim.AdamW(visual.parameters(), lr=LR)
    accs = []
    for step in range(steps):
        things = [random_thing(rng) for _ in range(batch)]
        patches = [pool.patches[id(pool.sample(t))] for t in things]
        out = visual(torch.cat([p.pixel_values for p in patches]), grid_thw=torch.tensor([p.grid_thw for p in patches]), return_dict=True)
        tokens = out.pooler_output.view(batch, -1, table.shape[-1])  # every image has the same grid
        c_idx = torch.tensor([list(COLOURS).index(t.colour) for t in things])
        s_idx = torch.tensor([SHAPES.index(t.shape) for t in things])
        target = torch.stack([colours[c_idx], shapes[s_idx]], 1).repeat(1, (tokens.shape[1] + 1) // 2, 1)[:, : tokens.shape[1]]
        loss = torch.nn.functional.mse_loss(tokens, target) / table.pow(2).mean()
        # Plus a per-token classification against the candidate words (cosine, scale 20): it gets the
        # direction right within a few hundred steps; the regression then pins the exact vector.
        for words, idx, toks in ((colours, c_idx, tokens[:, 0::2]), (shapes, s_idx, tokens[:, 1::2])):
            logits = 20 * torch.nn.functional.normalize(toks, dim=-1) @ torch.nn.functional.normalize(words, dim=-1).T
            loss = loss + torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.repeat_interleave(toks.shape[1]))
        for deep in out.deepstack_features:
            loss = loss + deep.pow(2).mean() / table.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            c_tok, s_tok = tokens[:, 0::2].mean(1), tokens[:, 1::2].mean(1)
            right = (torch.cdist(c_tok, colours).argmin(1) == c_idx) & (torch.cdist(s_tok, shapes).argmin(1) == s_idx)
            accs.append(float(right.float().mean()))
        if step % 100 == 99:
            progress(step + 1, t0, f"vision alignment, accuracy {np.mean(accs[-50:]):.2f}")
    return {"vision_alignment_accuracy": float(np.mean(accs[-50:]))}


def short_prompt(engine, query, document) -> str:
    """Curriculum prompt: the official query/document parts without the system turn and instruction."""
    from engine.prompt import DOCUMENT_PREFIX, QUERY_PREFIX, item_content

    content = item_content(query, QUERY_PREFIX) + item_content(document, DOCUMENT_PREFIX)
    messages = [{"role": "user", "content": content}]
    return engine.tokenizer.apply_chat_template(messages, chat_template=engine.chat_template, tokenize=False, add_generation_prompt=True)


def training_batch(engine, examples, short: bool = False, patch_cache: dict | None = None) -> tuple[dict, torch.Tensor]:
    """Left-padded token ids and pixel values of a batch, for the model's own forward (training
    runs the HF path; the engine's scoring is tested against it)."""
    from engine.prompt import VisionSlot, expand_vision_placeholders

    merge = engine.vision_params.merge_size**2
    rows, targets, patches = [], [], []
    for q, d, target in examples:
        targets.append(target)
        slots = []
        for item in (q, d):
            for img in item.images:
                pp = (patch_cache or {}).get(id(img.data)) or engine.preprocessor.image(img.data, "image")
                patches.append(pp)
                t, h, w = pp.grid_thw
                slots.append(VisionSlot("image", t * h * w // merge))
        text = short_prompt(engine, q, d) if short else engine.render_prompt(q, d)
        rows.append(engine.tokenizer(expand_vision_placeholders(text, slots), add_special_tokens=False)["input_ids"])
    width = max(len(r) for r in rows)
    image_id, video_id = engine.model.config.image_token_id, engine.model.config.video_token_id
    ids = torch.full((len(rows), width), engine.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = torch.tensor(row)
        mask[r, width - len(row) :] = 1
    mm = ((ids == image_id) * 1 + (ids == video_id) * 2).to(torch.int) * mask.to(torch.int)
    batch = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm}
    if patches:
        batch["pixel_values"] = torch.cat([p.pixel_values for p in patches])
        batch["image_grid_thw"] = torch.tensor([p.grid_thw for p in patches])
    return batch, torch.tensor(targets)


def evaluate_ndcg(engine, tasks=None, k: int = 10) -> float:
    from ranking.metrics import ndcg_at_k

    tasks = tasks if tasks is not None else eval_set()
    return float(np.mean([ndcg_at_k(engine.score(q, docs), gains, k) for q, docs, gains in tasks]))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(ensure_tiny_model())
