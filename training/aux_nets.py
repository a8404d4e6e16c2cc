"""The auxiliary networks of ``mini``: depth estimator (DPT-Hybrid), CLIP (metrics), BLIP captioner.

``python -m training.aux_nets --out DIR [--resume] [--only depth|clip|blip]`` renders a set of
scene frames (seeds :data:`TRAIN_SEED0` onwards, cached under the work folder), trains the three
networks one after another on one thread, evaluates each on held-out scenes (seeds
:data:`HELDOUT_SEED0` onwards, never trained on) and writes, in the formats the real models use:

- ``DIR/depth_estimator/`` (``DPTForDepthEstimation``, hybrid, as SD2-depth's) and
  ``DIR/feature_extractor/`` (its ``DPTImageProcessor`` at :data:`IMAGE`): the diffusers
  pipeline layout, beside the other components of the pipeline folder;
- ``DIR/captioner/`` (``BlipForConditionalGeneration`` + ``BlipProcessor``, BERT tokenizer from
  the scene vocabulary), the subfolder :func:`p2v_fast.models._load_captioner` reads;
- ``DIR/clip/`` (``CLIPModel`` + ``CLIPProcessor`` with the scene ``CLIPTokenizer``), what
  ``p2v eval --clip-model mini`` loads;
- ``DIR/recipe.json``: seeds, steps, losses, wall time, machine, held-out numbers.

Weights are fp16 safetensors. Training state (fp32, optimizer) is checkpointed every
:data:`CHECKPOINT_S` seconds under the work folder (``--work``, default ``DIR.aux-work`` beside
``DIR``), and ``--resume`` continues from it; a finished network is not retrained on resume.

Losses:
- depth: MiDaS's scale-and-shift-invariant MAE on inverse depth (prediction and target each
  shifted by their median and scaled by their mean absolute deviation), the target ``1/z`` from
  the renderer's metric camera z; plus a weak L1 to ``DISP_SCALE / z`` that fixes the output's
  range (DPT's head ends in a ReLU, which must not clip the far pixels to zero).
- CLIP: symmetric InfoNCE with learned temperature; identical captions in a batch are all
  positives; each image also sees a caption with one attribute changed (colour, shape or floor)
  as an extra negative, so the colour words matter.
- BLIP: next-token cross-entropy on the grammar caption (teacher forcing), as BLIP is trained.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGE = 64
#: Training scenes are seeds TRAIN_SEED0 .. TRAIN_SEED0 + n - 1; held-out ones start at HELDOUT_SEED0.
TRAIN_SEED0 = 1_000_000
HELDOUT_SEED0 = 9_000_000
#: Frames per training scene: t = 0 and one random t in [1, CLIP_FRAMES).
CLIP_FRAMES = 16
DISP_SCALE = 4.0  # the weak absolute target is 4 / z (z in 2.5 .. 10 on these scenes)
CHECKPOINT_S = 180.0
NETS = ("depth", "clip", "blip")

# ------------------------------------------------------------------------------------------
# configs (the mini sizes; tests pass smaller ones)

DPT_CONFIG: dict[str, Any] = dict(
    is_hybrid=True,
    image_size=IMAGE,
    patch_size=16,
    num_channels=3,
    hidden_size=64,
    num_hidden_layers=4,
    backbone_out_indices=[0, 1, 2, 3],
    num_attention_heads=4,
    intermediate_size=128,
    hidden_act="gelu",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    initializer_range=0.02,
    readout_type="project",
    reassemble_factors=[4, 2, 1, 0.5],
    neck_hidden_sizes=[32, 48, 64, 64],
    fusion_hidden_size=32,
    head_in_index=-1,
    use_auxiliary_head=False,
    backbone_featmap_shape=[1, 96, IMAGE // 16, IMAGE // 16],
    backbone_config={
        "global_padding": "same",
        "layer_type": "bottleneck",
        "depths": [1, 1, 2],
        "hidden_sizes": [32, 48, 96],
        "embedding_size": 32,
        "out_features": ["stage1", "stage2", "stage3"],
        "embedding_dynamic_padding": True,
        "num_groups": 4,
    },
)

CLIP_TEXT: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77)
CLIP_VISION: dict[str, Any] = dict(image_size=IMAGE, patch_size=8, hidden_size=96, intermediate_size=192,
                                   num_hidden_layers=3, num_attention_heads=4)
CLIP_PROJECTION = 64

BLIP_TEXT: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=40)
BLIP_VISION: dict[str, Any] = dict(image_size=IMAGE, patch_size=8, hidden_size=96, intermediate_size=192,
                                   num_hidden_layers=3, num_attention_heads=4)
BLIP_MAX_LEN = 24  # tokens of a caption with [DEC] and [SEP]; the longest grammar caption has 17


@dataclass
class Plan:
    """How much of each: scenes rendered, steps, batch sizes, learning rates."""

    train_scenes: int = 4000
    heldout_scenes: int = 200
    depth_steps: int = 2000
    depth_batch: int = 16
    depth_lr: float = 1e-3
    clip_steps: int = 1500
    clip_batch: int = 64
    clip_lr: float = 1e-3
    blip_steps: int = 2000
    #: then cosine cycles of these many steps at half, then a quarter of the rate (0: none)
    blip_steps2: int = 3000
    blip_steps3: int = 3000
    blip_batch: int = 32
    blip_lr: float = 1e-3
    seed: int = 0


# ------------------------------------------------------------------------------------------
# data


@dataclass
class SceneSet:
    frames: np.ndarray  # uint8 [N, H, W, 3]
    depth: np.ndarray  # float32 [N, H, W], metric camera z
    captions: list[str]
    objects: list[list[dict[str, Any]]]  # per frame: the scene's objects left to right at t = 0
    floors: list[str]
    seeds: np.ndarray  # int64 [N]


def _ordered_objects(scene: Any) -> list[dict[str, Any]]:
    """The scene's objects in caption order (the caption names them left to right at t = 0)."""
    from p2v_fast.media.scenes import caption_of

    caption = caption_of(scene)
    objs = [{"colour": o.colour, "shape": o.shape} for o in scene.objects]
    order: list[dict[str, Any]] = []
    for part in caption.split(" on a ")[0].split(" and "):
        _, colour, shape = part.split()
        order.append(next(o for o in objs if o["colour"] == colour and o["shape"] == shape))
    return order


def render_set(seed0: int, n_scenes: int, frames_per_scene: int, size: int = IMAGE,
               progress: Callable[[int], None] | None = None) -> SceneSet:
    """Frames of scenes ``seed0 .. seed0 + n_scenes - 1``: t = 0, then random times in the clip."""
    from dataclasses import replace

    from p2v_fast.media.scenes import caption_of, random_scene, render_frame

    frames, depth, captions, objects, floors, seeds = [], [], [], [], [], []
    for i in range(n_scenes):
        seed = seed0 + i
        rng = np.random.default_rng(seed)
        scene = replace(random_scene(rng, CLIP_FRAMES), seed=seed)
        caption = caption_of(scene)
        ordered = _ordered_objects(scene)
        times = [0.0] + [float(t) for t in rng.integers(1, CLIP_FRAMES, size=frames_per_scene - 1)]
        for t in times:
            f = render_frame(scene, t, (size, size))
            frames.append(f.image)
            depth.append(f.depth.astype(np.float32))
            captions.append(caption)
            objects.append(ordered)
            floors.append(scene.floor)
            seeds.append(seed)
        if progress is not None:
            progress(i + 1)
    return SceneSet(np.stack(frames), np.stack(depth), captions, objects, floors, np.asarray(seeds, np.int64))


def _save_set(s: SceneSet, path: Path, render_s: float = 0.0) -> None:
    meta = json.dumps({"captions": s.captions, "objects": s.objects, "floors": s.floors, "render_s": render_s})
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, frames=s.frames, depth=s.depth, seeds=s.seeds, meta=np.frombuffer(meta.encode(), np.uint8))
    os.replace(tmp, path)


def _load_set(path: Path) -> SceneSet:
    with np.load(path) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        return SceneSet(z["frames"], z["depth"], meta["captions"], meta["objects"], meta["floors"], z["seeds"])


def cached_set(work: Path, name: str, seed0: int, n_scenes: int, frames_per_scene: int,
               log: Callable[[str], None]) -> SceneSet:
    path = work / f"{name}-{seed0}-{n_scenes}x{frames_per_scene}.npz"
    if path.is_file():
        return _load_set(path)
    t0 = time.time()

    def progress(i: int) -> None:
        if i % 500 == 0 or i == n_scenes:
            log(f"render {name}: {i}/{n_scenes} scenes, {time.time() - t0:.0f} s")

    s = render_set(seed0, n_scenes, frames_per_scene, progress=progress)
    _save_set(s, path, round(time.time() - t0, 1))
    return s


def cached_render_s(work: Path) -> float | None:
    """Seconds the cached sets took to render (None where a cache predates this record)."""
    total = 0.0
    for path in work.glob("*.npz"):
        with np.load(path) as z:
            got = json.loads(z["meta"].tobytes().decode()).get("render_s")
        if got is None:
            return None
        total += got
    return round(total, 1)


# ------------------------------------------------------------------------------------------
# helpers


def _torch():
    import torch

    return torch


def _lr_stages(step: int, stages: Sequence[tuple[int, float]]) -> float:
    """Cosine cycles one after another: ``stages`` is ``[(steps, base_lr), ...]``."""
    for steps, base in stages:
        if step < steps:
            return _lr_at(step, steps, base)
        step -= steps
    return _lr_at(stages[-1][0], stages[-1][0], stages[-1][1])


def _lr_at(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _to_pixels(frames: np.ndarray, mean: Sequence[float], std: Sequence[float]):
    """uint8 [B,H,W,3] -> normalised float [B,3,H,W] (what the image processors give at this size)."""
    torch = _torch()
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


class Trainer:
    """A resumable loop: ``step_fn(step) -> loss`` on one model + AdamW, checkpointed by time."""

    def __init__(self, name: str, model: Any, lr: float, steps: int, work: Path, log: Callable[[str], None],
                 resume: bool, weight_decay: float = 0.01, stages: Sequence[tuple[int, float]] = ()) -> None:
        torch = _torch()
        self.name, self.model, self.lr, self.steps, self.log = name, model, lr, steps, log
        self.stages = list(stages) or [(steps, lr)]
        self.steps = sum(n for n, _ in self.stages)
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.ckpt = work / f"{name}.ckpt.pt"
        self.step = 0
        self.losses: list[float] = []
        self.wall = 0.0
        if resume and self.ckpt.is_file():
            state = torch.load(self.ckpt, map_location="cpu", weights_only=False)
            model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["opt"])
            self.step, self.losses, self.wall = state["step"], state["losses"], state["wall"]
            torch.set_rng_state(state["torch_rng"])
            log(f"{name}: resumed at step {self.step}/{self.steps}")

    def save(self) -> None:
        torch = _torch()
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                    "losses": self.losses, "wall": self.wall, "torch_rng": torch.get_rng_state()}, tmp)
        os.replace(tmp, self.ckpt)

    def run(self, step_fn: Callable[[int], Any], every: int = 50) -> None:
        torch = _torch()
        self.model.train()
        last_save = time.time()
        t_run = time.time()
        wall0 = self.wall
        while self.step < self.steps:
            for g in self.opt.param_groups:
                g["lr"] = _lr_stages(self.step, self.stages)
            loss = step_fn(self.step)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.losses.append(float(loss.detach()))
            self.step += 1
            self.wall = wall0 + time.time() - t_run
            if self.step % every == 0 or self.step == self.steps:
                recent = float(np.mean(self.losses[-every:]))
                rate = self.wall / self.step if self.step else 0.0
                self.log(f"{self.name}: step {self.step}/{self.steps} loss {recent:.4f} "
                         f"({rate:.2f} s/step, {self.wall / 60:.1f} min)")
            if time.time() - last_save > CHECKPOINT_S:
                self.save()
                last_save = time.time()
        self.save()
        self.model.eval()

    def summary(self) -> dict[str, Any]:
        n = max(1, len(self.losses) // 20)
        return {"steps": self.step, "lr": self.lr, "lr_cycles": self.stages,
                "loss_first": float(np.mean(self.losses[:n])), "loss_last": float(np.mean(self.losses[-n:])),
                "train_wall_s": round(self.wall, 1)}


def _save_fp16(model: Any, folder: Path) -> None:
    torch = _torch()
    model.to(torch.float16)
    model.save_pretrained(str(folder), safe_serialization=True)
    model.to(torch.float32)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------
# depth


def build_depth(config: dict[str, Any] | None = None, seed: int = 0):
    from transformers import DPTConfig, DPTForDepthEstimation

    torch = _torch()
    torch.manual_seed(seed)
    return DPTForDepthEstimation(DPTConfig(**(config or DPT_CONFIG)))


def ssi_mae(pred, target):
    """MiDaS's scale-and-shift-invariant MAE: both maps median-centred and scaled by their mean
    absolute deviation, per image; ``pred``, ``target`` [B, H, W]."""
    def norm(x):
        flat = x.flatten(1)
        med = flat.median(dim=1, keepdim=True).values
        c = flat - med
        s = c.abs().mean(dim=1, keepdim=True).clamp_min(1e-6)
        return c / s

    return (norm(pred) - norm(target)).abs().mean()


def align_ls(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares scale and shift of ``pred`` onto ``target`` (one image)."""
    a = np.stack([pred.ravel(), np.ones(pred.size)], 1)
    (s, t), *_ = np.linalg.lstsq(a, target.ravel(), rcond=None)
    return s * pred + t


def _depth_pred(model: Any, pixels):
    torch = _torch()
    out = model(pixel_values=pixels).predicted_depth
    if out.shape[-2:] != pixels.shape[-2:]:
        out = torch.nn.functional.interpolate(out[:, None], size=pixels.shape[-2:], mode="bilinear",
                                              align_corners=False)[:, 0]
    return out


def train_depth(data: SceneSet, plan: Plan, work: Path, log: Callable[[str], None], resume: bool,
                config: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    torch = _torch()
    model = build_depth(config, plan.seed)
    size = (config or DPT_CONFIG)["image_size"]
    frames = data.frames
    if frames.shape[1] != size:
        frames = _resize_frames(frames, size)
        depth = _resize_depth(data.depth, size)
    else:
        depth = data.depth
    disp = (DISP_SCALE / np.maximum(depth, 1e-3)).astype(np.float32)
    trainer = Trainer("depth", model, plan.depth_lr, plan.depth_steps, work, log, resume)
    n = len(frames)

    def step_fn(step: int):
        rng = np.random.default_rng((plan.seed, 1, step))
        idx = rng.integers(0, n, plan.depth_batch)
        x, y = frames[idx], disp[idx]
        flip = rng.random(len(idx)) < 0.5
        x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
        y = np.where(flip[:, None, None], y[:, :, ::-1], y)
        pix = _to_pixels(x, [0.5] * 3, [0.5] * 3)
        target = torch.from_numpy(np.ascontiguousarray(y))
        pred = _depth_pred(model, pix)
        return ssi_mae(pred, target) + 0.1 * (pred - target).abs().mean()

    trainer.run(step_fn)
    return model, trainer.summary()


def eval_depth(model: Any, processor: Any, data: SceneSet) -> dict[str, Any]:
    """Held-out: per image, the prediction aligned to the true inverse depth by least squares;
    AbsRel of the aligned inverse depth, Pearson r, and the share of pixel pairs (random, at
    least 5 % apart in depth) ordered correctly (nearer = larger)."""
    torch = _torch()
    absrel, corr, order = [], [], []
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for i in range(0, len(data.frames), 32):
            pv = processor(images=list(data.frames[i:i + 32]), return_tensors="pt")["pixel_values"]
            pred = _depth_pred(model, pv.float()).numpy()
            for p, z in zip(pred, data.depth[i:i + 32], strict=True):
                if p.shape != z.shape:
                    p = np.asarray(torch.nn.functional.interpolate(torch.from_numpy(p)[None, None], size=z.shape,
                                                                   mode="bilinear", align_corners=False)[0, 0])
                d = 1.0 / z
                a = align_ls(p, d)
                absrel.append(float(np.mean(np.abs(a - d) / d)))
                corr.append(float(np.corrcoef(p.ravel(), d.ravel())[0, 1]) if p.std() > 0 else 0.0)
                u = rng.integers(0, z.size, 400)
                v = rng.integers(0, z.size, 400)
                zu, zv = z.ravel()[u], z.ravel()[v]
                keep = np.abs(zu - zv) > 0.05 * np.minimum(zu, zv)
                pu, pv_ = p.ravel()[u][keep], p.ravel()[v][keep]
                order.append(float(np.mean((pu > pv_) == (zu[keep] < zv[keep]))))
    return {"absrel_aligned_inverse_depth": float(np.mean(absrel)),
            "pearson_inverse_depth": float(np.mean(corr)),
            "pair_order_accuracy": float(np.mean(order)),
            "images": len(data.frames)}


def _resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.Resampling.BICUBIC)) for f in frames])


def _resize_depth(depth: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(d).resize((size, size), Image.Resampling.NEAREST)) for d in depth])


def dpt_processor(size: int = IMAGE):
    from p2v_fast.weights.tiny import dpt_image_processor

    return dpt_image_processor(size)


# ------------------------------------------------------------------------------------------
# captions: tokenizers and perturbations


def _palette() -> tuple[list[str], list[str], list[str]]:
    from p2v_fast.media.scenes import COLOURS, PATTERNS, SHAPES

    return list(COLOURS), list(SHAPES), list(PATTERNS)


def perturb_caption(caption: str, rng: np.random.Generator) -> str:
    """The caption with one attribute changed: an object's colour or shape, or the floor pattern."""
    colours, shapes, patterns = _palette()
    words = caption.split()
    kind = rng.integers(0, 3)
    if kind == 2:
        pos = len(words) - 2  # "... on a <pattern> floor"
        pool = patterns
    else:
        pool = colours if kind == 0 else shapes
        positions = [i for i, w in enumerate(words) if w in pool]
        pos = int(rng.choice(positions))
    words[pos] = str(rng.choice([w for w in pool if w != words[pos]]))
    return " ".join(words)


def parse_caption(caption: str) -> tuple[list[tuple[str, str]], str | None]:
    """``"a red sphere and a blue cube on a plain floor"`` -> ([(red, sphere), (blue, cube)], plain)."""
    colours, shapes, patterns = _palette()
    head, _, tail = caption.partition(" on a ")
    objs = []
    for part in head.split(" and "):
        w = part.split()
        colour = next((x for x in w if x in colours), "?")
        shape = next((x for x in w if x in shapes), "?")
        objs.append((colour, shape))
    floor = next((x for x in tail.split() if x in patterns), None)
    return objs, floor


# ------------------------------------------------------------------------------------------
# CLIP


def clip_image_processor(size: int = IMAGE):
    from p2v_fast.weights.hub import image_processor_class

    return image_processor_class("CLIPImageProcessor")(size={"shortest_edge": size},
                                                       crop_size={"height": size, "width": size})


def build_clip(tokenizer: Any, text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None,
               projection: int = CLIP_PROJECTION, seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    torch = _torch()
    text_cfg = dict(text or CLIP_TEXT, vocab_size=len(tokenizer), projection_dim=projection,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    vision_cfg = dict(vision or CLIP_VISION, projection_dim=projection)
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=projection))


def _feat(out: Any):
    """``get_*_features`` gives a tensor (transformers 4) or an output with ``pooler_output`` (5)."""
    from p2v_fast.quality.metrics import _features

    return _features(out)


def _tok(tokenizer: Any, texts: list[str], max_len: int = 24):
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def train_clip(data: SceneSet, tokenizer: Any, plan: Plan, work: Path, log: Callable[[str], None], resume: bool,
               text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None,
               projection: int = CLIP_PROJECTION) -> tuple[Any, dict[str, Any]]:
    torch = _torch()
    F = torch.nn.functional
    model = build_clip(tokenizer, text, vision, projection, plan.seed)
    size = model.config.vision_config.image_size
    frames = data.frames if data.frames.shape[1] == size else _resize_frames(data.frames, size)
    proc = clip_image_processor(size)
    mean, std = proc.image_mean, proc.image_std
    trainer = Trainer("clip", model, plan.clip_lr, plan.clip_steps, work, log, resume, weight_decay=0.05)
    n = len(frames)

    def step_fn(step: int):
        rng = np.random.default_rng((plan.seed, 2, step))
        idx = rng.integers(0, n, plan.clip_batch)
        caps = [data.captions[i] for i in idx]
        hard = [perturb_caption(c, rng) for c in caps]
        ids, mask = _tok(tokenizer, caps + hard)
        pix = _to_pixels(frames[idx], mean, std)
        img = F.normalize(_feat(model.get_image_features(pixel_values=pix)), dim=-1)
        txt = F.normalize(_feat(model.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100.0)
        b = len(idx)
        same = torch.tensor([[a == c for c in caps] for a in caps], dtype=torch.float32)
        # image -> text over the batch's captions and the perturbed ones (never positives)
        logits_i = scale * img @ txt.T  # [b, 2b]
        target_i = torch.cat([same, torch.zeros(b, b)], 1)
        target_i = target_i / target_i.sum(1, keepdim=True)
        loss_i = -(target_i * F.log_softmax(logits_i, 1)).sum(1).mean()
        logits_t = scale * txt[:b] @ img.T
        target_t = same / same.sum(1, keepdim=True)
        loss_t = -(target_t * F.log_softmax(logits_t, 1)).sum(1).mean()
        return 0.5 * (loss_i + loss_t)

    trainer.run(step_fn)
    return model, trainer.summary()


def eval_clip(model: Any, processor: Any, data: SceneSet) -> dict[str, Any]:
    """Held-out: caption retrieval top-1 among the held-out set's distinct captions; and for each
    object, whether its true colour word scores highest among the palette's (other words kept)."""
    torch = _torch()
    F = torch.nn.functional
    colours, _, _ = _palette()
    with torch.no_grad():
        pix = processor(images=list(data.frames), return_tensors="pt")["pixel_values"]
        img = F.normalize(_feat(model.get_image_features(pixel_values=pix)), dim=-1)

        def text_emb(texts: list[str]):
            enc = processor(text=texts, return_tensors="pt", padding=True)
            return F.normalize(_feat(model.get_text_features(input_ids=enc["input_ids"],
                                                             attention_mask=enc["attention_mask"])), dim=-1)

        distinct = sorted(set(data.captions))
        txt = text_emb(distinct)
        best = (img @ txt.T).argmax(1).tolist()
        top1 = float(np.mean([distinct[b] == c for b, c in zip(best, data.captions, strict=True)]))
        right, total = 0, 0
        for k, cap in enumerate(data.captions):
            words = cap.split()
            for pos, w in enumerate(words):
                if w not in colours:
                    continue
                variants = [" ".join([*words[:pos], c, *words[pos + 1:]]) for c in colours]
                s = (img[k:k + 1] @ text_emb(variants).T)[0]
                right += int(colours[int(s.argmax())] == w)
                total += 1
    return {"caption_top1": top1, "distinct_captions": len(distinct), "colour_word_top1": right / max(1, total),
            "colour_slots": total, "images": len(data.frames)}


# ------------------------------------------------------------------------------------------
# BLIP


def blip_image_processor(size: int = IMAGE):
    from p2v_fast.weights.hub import image_processor_class

    return image_processor_class("BlipImageProcessor")(size={"height": size, "width": size})


def build_blip(tokenizer: Any, text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None,
               seed: int = 0):
    from transformers import BlipConfig, BlipForConditionalGeneration

    torch = _torch()
    ids = tokenizer.convert_tokens_to_ids
    vision_cfg = dict(vision or BLIP_VISION)
    text_cfg = dict(text or BLIP_TEXT, vocab_size=len(tokenizer), encoder_hidden_size=vision_cfg["hidden_size"],
                    bos_token_id=ids("[DEC]"), eos_token_id=ids("[SEP]"), sep_token_id=ids("[SEP]"),
                    pad_token_id=ids("[PAD]"), label_smoothing=0.0)
    torch.manual_seed(seed)
    config = BlipConfig(text_config=text_cfg, vision_config=vision_cfg,
                        projection_dim=text_cfg["hidden_size"])
    return BlipForConditionalGeneration(config)


def train_blip(data: SceneSet, tokenizer: Any, plan: Plan, work: Path, log: Callable[[str], None], resume: bool,
               text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    torch = _torch()
    model = build_blip(tokenizer, text, vision, plan.seed)
    size = model.config.vision_config.image_size
    frames = data.frames if data.frames.shape[1] == size else _resize_frames(data.frames, size)
    proc = blip_image_processor(size)
    mean, std = proc.image_mean, proc.image_std
    bos = tokenizer.convert_tokens_to_ids("[DEC]")
    pad = tokenizer.pad_token_id
    enc = tokenizer(data.captions, padding="max_length", truncation=True, max_length=BLIP_MAX_LEN,
                    return_tensors="pt")
    all_ids = enc["input_ids"]
    all_ids[:, 0] = bos  # BLIP's decoder starts from [DEC] where BERT put [CLS]
    all_mask = enc["attention_mask"]
    stages = [(plan.blip_steps, plan.blip_lr), (plan.blip_steps2, plan.blip_lr / 2),
              (plan.blip_steps3, plan.blip_lr / 4)]
    stages = [st for st in stages if st[0] > 0]
    trainer = Trainer("blip", model, plan.blip_lr, plan.blip_steps, work, log, resume, stages=stages)
    n = len(frames)

    def step_fn(step: int):
        rng = np.random.default_rng((plan.seed, 3, step))
        idx = torch.from_numpy(rng.integers(0, n, plan.blip_batch))
        ids, mask = all_ids[idx], all_mask[idx]
        labels = ids.masked_fill(ids == pad, -100)
        pix = _to_pixels(frames[idx.numpy()], mean, std)
        return model(pixel_values=pix, input_ids=ids, attention_mask=mask, labels=labels).loss

    trainer.run(step_fn)
    return model, trainer.summary()


def caption_scores(generated: list[str], data: SceneSet) -> dict[str, Any]:
    """Exact-caption rate and per-attribute accuracy (objects matched by their place in the caption)."""
    exact = colour = shape = both = slots = floor = count = 0
    for g, cap, objs, fl in zip(generated, data.captions, data.objects, data.floors, strict=True):
        exact += int(g == cap)
        got, got_floor = parse_caption(g)
        floor += int(got_floor == fl)
        count += int(len(got) == len(objs))
        for k, o in enumerate(objs):
            slots += 1
            if k < len(got):
                colour += int(got[k][0] == o["colour"])
                shape += int(got[k][1] == o["shape"])
                both += int(got[k] == (o["colour"], o["shape"]))
    n = max(1, len(generated))
    return {"exact_caption": exact / n, "colour": colour / max(1, slots), "shape": shape / max(1, slots),
            "colour_and_shape": both / max(1, slots), "floor_pattern": floor / n, "object_count": count / n,
            "images": len(generated)}


def eval_blip(model: Any, processor: Any, data: SceneSet) -> tuple[dict[str, Any], list[str]]:
    """Held-out captions through the project's own path (processor, greedy generate, decode)."""
    torch = _torch()
    out: list[str] = []
    with torch.no_grad():
        for i in range(0, len(data.frames), 32):
            pv = processor(images=list(data.frames[i:i + 32]), return_tensors="pt")["pixel_values"]
            ids = model.generate(pixel_values=pv, max_new_tokens=30, do_sample=False, num_beams=1)
            out += [processor.decode(x, skip_special_tokens=True).strip() for x in ids]
    return caption_scores(out, data), out


# ------------------------------------------------------------------------------------------
# a picture of the held-out results


def write_figure(model_dir: Path, png: Path, n: int = 6, scale: int = 3) -> Path:
    """Held-out scenes as columns: the frame, the true inverse depth, the shipped DPT's (min-max
    normalised, brighter = nearer), and under them the BLIP caption over the true one."""
    from PIL import Image, ImageDraw
    from transformers import BlipForConditionalGeneration, BlipProcessor, DPTForDepthEstimation

    from p2v_fast.weights.hub import image_processor_class

    torch = _torch()
    held = render_set(HELDOUT_SEED0, n, 1)
    dpt = DPTForDepthEstimation.from_pretrained(str(model_dir / "depth_estimator"), dtype=torch.float32).eval()
    dproc = image_processor_class("DPTImageProcessor").from_pretrained(str(model_dir / "feature_extractor"))
    blip = BlipForConditionalGeneration.from_pretrained(str(model_dir / "captioner"), dtype=torch.float32).eval()
    bproc = BlipProcessor.from_pretrained(str(model_dir / "captioner"))
    with torch.no_grad():
        pred = _depth_pred(dpt, dproc(images=list(held.frames), return_tensors="pt")["pixel_values"]).numpy()
    _, captions = eval_blip(blip, bproc, held)

    def grey(x: np.ndarray) -> np.ndarray:
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
        return np.repeat((255 * x).astype(np.uint8)[..., None], 3, -1)

    s = IMAGE * scale
    text_h = 100
    sheet = Image.new("RGB", (n * (s + 8) + 8, 3 * (s + 8) + text_h + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for k in range(n):
        x = 8 + k * (s + 8)
        for row, img in enumerate((held.frames[k], grey(1.0 / held.depth[k]), grey(pred[k]))):
            sheet.paste(Image.fromarray(img).resize((s, s), Image.Resampling.NEAREST), (x, 8 + row * (s + 8)))
        y = 8 + 3 * (s + 8)
        for j, (label, text) in enumerate((("BLIP", captions[k]), ("true", held.captions[k]))):
            words, lines = text.split(), []
            while words:
                line = words.pop(0)
                while words and len(line) + 1 + len(words[0]) <= 30:
                    line += " " + words.pop(0)
                lines.append(line)
            draw.text((x, y), f"{label}: " + "\n".join(lines), fill=(0, 0, 0) if j == 0 else (90, 90, 90))
            y += 12 * len(lines) + 4
    png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(png)
    return png


# ------------------------------------------------------------------------------------------
# the command


def _machine() -> dict[str, Any]:
    torch = _torch()
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def run(out: Path, work: Path | None = None, resume: bool = False, only: Sequence[str] = NETS,
        plan: Plan | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume) the networks in ``only`` and write them into ``out``; returns the recipe."""
    import transformers
    from transformers import BlipProcessor, CLIPProcessor

    from training.tokenizer import build_scene_bert_vocab, build_scene_clip_tokenizer

    plan = plan or Plan()
    out = Path(out)
    work = Path(work) if work is not None else out.parent / (out.name + ".aux-work")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    recipe_path = out / "recipe.json"
    recipe: dict[str, Any] = {}
    if recipe_path.is_file():
        recipe = json.loads(recipe_path.read_text(encoding="utf-8"))
    recipe.update({
        "command": "python -m training.aux_nets --out DIR" , "plan": plan.__dict__,
        "train_seeds": [TRAIN_SEED0, TRAIN_SEED0 + plan.train_scenes - 1],
        "heldout_seeds": [HELDOUT_SEED0, HELDOUT_SEED0 + plan.heldout_scenes - 1],
        "frames_per_train_scene": "t = 0 and one random t in [1, 16)", "image_size": IMAGE,
        "machine": _machine(), "transformers": transformers.__version__,
    })
    t0 = time.time()
    train = cached_set(work, "train", TRAIN_SEED0, plan.train_scenes, 2, log)
    held = cached_set(work, "heldout", HELDOUT_SEED0, plan.heldout_scenes, 1, log)
    recipe["render_s"] = cached_render_s(work) or recipe.get("render_s") or round(time.time() - t0, 1)
    recipe["train_frames"] = len(train.frames)

    def finish(name: str, entry: dict[str, Any]) -> None:
        before = recipe.get("nets", {}).get(name)
        if before and before.get("steps") != entry.get("steps"):  # trained on further by --resume
            entry["earlier"] = {k: before.get(k) for k in ("steps", "heldout", "train_wall_s", "wall_s")}
        recipe.setdefault("nets", {})[name] = entry
        recipe_path.write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
        log(f"{name}: {json.dumps(entry.get('heldout'))}")

    def done(name: str) -> bool:
        return resume and (work / f"{name}.done").is_file()

    if "depth" in only and not done("depth"):
        t = time.time()
        model, summary = train_depth(train, plan, work, log, resume)
        proc = dpt_processor(IMAGE)
        heldout = eval_depth(model, proc, held)
        for sub in ("depth_estimator", "feature_extractor"):
            shutil.rmtree(out / sub, ignore_errors=True)
        _save_fp16(model, out / "depth_estimator")
        proc.save_pretrained(str(out / "feature_extractor"))
        finish("depth", {**summary, "class": "DPTForDepthEstimation", "parameters": _params(model),
                         "bytes": _folder_bytes(out / "depth_estimator"), "wall_s": round(time.time() - t, 1),
                         "loss": "ssi_mae(inverse depth) + 0.1 * L1(4 / z)", "heldout": heldout})
        (work / "depth.done").touch()

    if "clip" in only and not done("clip"):
        t = time.time()
        tokenizer = build_scene_clip_tokenizer(work / "clip_tokenizer")
        model, summary = train_clip(train, tokenizer, plan, work, log, resume)
        processor = CLIPProcessor(image_processor=clip_image_processor(IMAGE), tokenizer=tokenizer)
        heldout = eval_clip(model, processor, held)
        shutil.rmtree(out / "clip", ignore_errors=True)
        _save_fp16(model, out / "clip")
        processor.save_pretrained(str(out / "clip"))
        finish("clip", {**summary, "class": "CLIPModel", "parameters": _params(model),
                        "bytes": _folder_bytes(out / "clip"), "wall_s": round(time.time() - t, 1),
                        "loss": "InfoNCE (same captions positive) + one perturbed caption per image as a negative",
                        "heldout": heldout})
        (work / "clip.done").touch()

    if "blip" in only and not done("blip"):
        t = time.time()
        tokenizer = build_scene_bert_vocab(work / "bert_vocab")
        model, summary = train_blip(train, tokenizer, plan, work, log, resume)
        bproc = BlipProcessor(image_processor=blip_image_processor(IMAGE), tokenizer=tokenizer)
        heldout, generated = eval_blip(model, bproc, held)
        shutil.rmtree(out / "captioner", ignore_errors=True)
        _save_fp16(model, out / "captioner")
        bproc.save_pretrained(str(out / "captioner"))
        samples = [{"seed": int(s), "truth": c, "caption": g}
                   for s, c, g in list(zip(held.seeds, held.captions, generated, strict=True))[:8]]
        finish("blip", {**summary, "class": "BlipForConditionalGeneration", "parameters": _params(model),
                        "bytes": _folder_bytes(out / "captioner"), "wall_s": round(time.time() - t, 1),
                        "loss": "next-token cross-entropy on the grammar caption", "heldout": heldout,
                        "samples": samples})
        (work / "blip.done").touch()
    return recipe


def _params(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.aux_nets", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for the weights (the mini model folder)")
    ap.add_argument("--work", type=Path, default=None, help="checkpoints and rendered data (default OUT.aux-work)")
    ap.add_argument("--resume", action="store_true", help="continue from the work folder's checkpoints")
    ap.add_argument("--only", choices=NETS, action="append", help="train only this network (repeatable)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--figure", type=Path, default=None,
                    help="only draw held-out frames, depth and captions of the weights in OUT into this PNG")
    args = ap.parse_args(argv)
    torch = _torch()
    torch.set_num_threads(max(1, args.threads))

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if args.figure is not None:
        log(f"wrote {write_figure(args.out, args.figure)}")
        return 0
    run(args.out, args.work, args.resume, tuple(args.only or NETS), log=log)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
