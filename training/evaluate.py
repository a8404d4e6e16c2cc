"""Held-out measurements of a ``mini`` pipeline folder (seeds below TRAIN_SEED0, never trained on).

    python -m training.evaluate FOLDER [--n 100] [--steps 50] [--json OUT.json]

Measured as DESIGN.md §5 reports them, one frame per held-out scene at 64x64, with the
renderer's ground-truth inverse depth as the depth input (so the UNet is measured, not the
depth estimator) and the object masks from the renderer:

- ``vae_psnr``: VAE reconstruction (mean latent) against the render, dB.
- ``gen_colour_acc`` / ``gen_colour_acc_empty``: DDIM 50 steps from random noise with the
  caption (guidance 7.5) / the empty caption; share of objects whose masked pixels' hue is
  nearest to the caption's colour among the palette's six.
- ``inv_regen_psnr``: DDIM inversion with the source caption (guidance 1) and regeneration
  with it (guidance 1), against the render, dB.
- ``edit_*``: one object's colour word changed, inverted with the source caption (guidance 1)
  and regenerated with the target caption (guidance 7.5 and 3): share of edited objects taking
  the target colour, of other objects keeping theirs, and the mean absolute change (0-255) of
  the background pixels.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2v_fast.media import scenes as sc
from training.data import CLIP_FRAMES, depth_condition

PALETTE_HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] for name, rgb in sc.COLOURS.items()}


def hue_name(pixels: np.ndarray) -> str:
    """Nearest palette colour (by hue) of uint8 pixels [N, 3] (their mean colour)."""
    r, g, b = (pixels.astype(np.float64).mean(axis=0) / 255.0).tolist()
    h = colorsys.rgb_to_hsv(r, g, b)[0]
    return min(PALETTE_HUES, key=lambda k: min(abs(h - PALETTE_HUES[k]), 1 - abs(h - PALETTE_HUES[k])))


def object_colours(image: np.ndarray, ids: np.ndarray, n_objects: int, min_pixels: int = 12) -> list[str | None]:
    """Each object's judged colour (None where its eroded mask has under ``min_pixels`` pixels)."""
    out: list[str | None] = []
    for k in range(1, n_objects + 1):
        m = ids == k
        # erode by one pixel: edges blend with the background
        er = m.copy()
        er[1:] &= m[:-1]
        er[:-1] &= m[1:]
        er[:, 1:] &= m[:, :-1]
        er[:, :-1] &= m[:, 1:]
        out.append(hue_name(image[er]) if er.sum() >= min_pixels else None)
    return out


@dataclass
class Held:
    scenes: list[Any]
    images: np.ndarray  # uint8 [N,H,W,3]
    ids: np.ndarray  # int16 [N,H,W]
    inv_depth: np.ndarray  # float32 [N,H,W]
    captions: list[str]


def held_out(n: int, size: int = 64, seed0: int = 500_000) -> Held:
    """``n`` held-out frames: seeds ``seed0 + i`` (all below the training seeds), mid-clip."""
    scenes, images, ids, inv, caps = [], [], [], [], []
    for i in range(n):
        rng = np.random.default_rng(seed0 + i)
        scene = sc.random_scene(rng, CLIP_FRAMES)
        t = float(rng.uniform(0, CLIP_FRAMES - 1))
        f = sc.render_frame(scene, t, (size, size))
        scenes.append((scene, t))
        images.append(f.image)
        ids.append(f.ids)
        inv.append(1.0 / f.depth)
        caps.append(sc.caption_of(scene))
    return Held(scenes, np.stack(images), np.stack(ids), np.stack(inv).astype(np.float32), caps)


class Sampler:
    """DDIM (eta 0) sampling and inversion on a loaded model set, fp32, CPU."""

    def __init__(self, models):
        self.m = models
        sch = models.scheduler
        self.abar = sch.alphas_cumprod.float()
        self.scale = float(models.vae.config.scaling_factor)

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        tok = self.m.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return self.m.text_encoder(ids)[0].float()

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        return self.m.vae.encode(x.to(self.m.vae.dtype)).latent_dist.mean.float() * self.scale

    @torch.no_grad()
    def decode(self, lat: torch.Tensor) -> np.ndarray:
        x = self.m.vae.decode((lat / self.scale).to(self.m.vae.dtype)).sample.float().clamp(-1, 1)
        return ((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()

    def timesteps(self, steps: int) -> list[int]:
        ratio = 1000 // steps
        return [int(t) for t in (np.arange(0, steps) * ratio).round()[::-1] + 1]  # steps_offset 1

    @torch.no_grad()
    def eps(self, x: torch.Tensor, t: int, depth: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
            guidance: float) -> torch.Tensor:
        unet = self.m.unet
        inp = torch.cat([x, depth], 1)
        if uncond is None or guidance == 1.0:
            return unet(inp.to(unet.dtype), t, encoder_hidden_states=cond.to(unet.dtype)).sample.float()
        e = unet(torch.cat([inp, inp]).to(unet.dtype), t,
                 encoder_hidden_states=torch.cat([uncond, cond]).to(unet.dtype)).sample.float()
        eu, ec = e.chunk(2)
        return eu + guidance * (ec - eu)

    def _ab(self, t: int) -> torch.Tensor:
        return self.abar[t] if t >= 0 else self.abar[0]  # final alpha: alphas_cumprod[0] (set_alpha_to_one False)

    def sample(self, xT, depth, cond, uncond, guidance, steps=50):
        ts = self.timesteps(steps)
        x = xT
        ratio = 1000 // steps
        for t in ts:
            e = self.eps(x, t, depth, cond, uncond, guidance)
            a, a_prev = self.abar[t], self._ab(t - ratio)
            x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
        return x

    def invert(self, x0, depth, cond, steps=50):
        ts = self.timesteps(steps)[::-1]
        ratio = 1000 // steps
        x = x0
        for t in ts:
            a_prev = self._ab(t - ratio)
            a = self.abar[t]
            e = self.eps(x, t, depth, cond, None, 1.0)
            xo = (x - (1 - a_prev).sqrt() * e) / a_prev.sqrt()
            x = a.sqrt() * xo + (1 - a).sqrt() * e
        return x


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))


def edit_targets(held: Held, seed: int = 0) -> list[tuple[int, str, str]]:
    """Per scene: (object index, target colour, target caption), the object's colour word changed."""
    rng = np.random.default_rng(seed)
    out = []
    for scene, _t in held.scenes:
        k = int(rng.integers(len(scene.objects)))
        ob = scene.objects[k]
        taken = {o.colour for o in scene.objects if o.shape == ob.shape}
        choices = [c for c in sc.COLOURS if c != ob.colour and c not in taken]
        c = choices[int(rng.integers(len(choices)))]
        out.append((k, c, sc.caption_of(sc.with_colour(scene, k, c))))
    return out


def evaluate(folder: str, n: int = 100, steps: int = 50, batch: int = 25, log=print) -> dict[str, Any]:
    from p2v_fast.weights.models import load_models

    t0 = time.time()
    models = load_models(folder, "cpu", torch.float32)
    s = Sampler(models)
    held = held_out(n)
    res: dict[str, Any] = {"n_scenes": n, "steps": steps, "size": 64,
                           "held_out_seeds": [500_000, 500_000 + n - 1]}
    lat = torch.cat([s.encode(held.images[i:i + batch]) for i in range(0, n, batch)])
    rec = np.concatenate([s.decode(lat[i:i + batch]) for i in range(0, n, batch)])
    res["vae_psnr"] = psnr(rec, held.images)
    log(f"eval: vae psnr {res['vae_psnr']:.2f}")
    depth = depth_condition(held.inv_depth, (int(lat.shape[-2]), int(lat.shape[-1])))
    uncond = s.embed([""])
    n_obj = [len(sc_[0].objects) for sc_ in held.scenes]
    truth = [[o.colour for o in sc_[0].objects] for sc_ in held.scenes]

    def run(fn):
        return torch.cat([fn(slice(i, min(i + batch, n))) for i in range(0, n, batch)])

    g = torch.Generator().manual_seed(1234)
    xT = torch.randn(lat.shape, generator=g)
    for label, caps in (("gen_colour_acc", held.captions), ("gen_colour_acc_empty", [""] * n)):
        cond = s.embed(caps)
        out = run(lambda sl, cond=cond: s.sample(xT[sl], depth[sl], cond[sl], uncond.expand(sl.stop - sl.start, -1, -1),
                                                 7.5, steps))
        imgs = np.concatenate([s.decode(out[i:i + batch]) for i in range(0, n, batch)])
        hits = tot = 0
        for i in range(n):
            for got, want in zip(object_colours(imgs[i], held.ids[i], n_obj[i]), truth[i], strict=True):
                if got is not None:
                    tot += 1
                    hits += got == want
        res[label] = hits / max(tot, 1)
        res[label + "_objects"] = tot
        if label == "gen_colour_acc":
            res["_gen_images"] = imgs
        log(f"eval: {label} {res[label]:.3f} ({tot} objects)")
    cond = s.embed(held.captions)
    inv = run(lambda sl: s.invert(lat[sl], depth[sl], cond[sl], steps))
    regen = run(lambda sl: s.sample(inv[sl], depth[sl], cond[sl], None, 1.0, steps))
    res["inv_regen_psnr"] = psnr(np.concatenate([s.decode(regen[i:i + batch]) for i in range(0, n, batch)]),
                                 held.images)
    log(f"eval: inversion + regeneration psnr {res['inv_regen_psnr']:.2f}")
    targets = edit_targets(held)
    tcond = s.embed([c for _, _, c in targets])
    for gs in (7.5, 3.0):
        out = run(lambda sl, gs=gs: s.sample(inv[sl], depth[sl], tcond[sl],
                                             uncond.expand(sl.stop - sl.start, -1, -1), gs, steps))
        imgs = np.concatenate([s.decode(out[i:i + batch]) for i in range(0, n, batch)])
        ok = tot = keep = ktot = 0
        bg = []
        for i, (k, c, _) in enumerate(targets):
            cols = object_colours(imgs[i], held.ids[i], n_obj[i])
            for j, got in enumerate(cols):
                if got is None:
                    continue
                if j == k:
                    tot += 1
                    ok += got == c
                else:
                    ktot += 1
                    keep += got == truth[i][j]
            m = held.ids[i] == 0
            bg.append(np.abs(imgs[i].astype(np.float64) - held.images[i])[m].mean())
        key = f"edit_g{gs:g}"
        res[key] = {"target_colour_rate": ok / max(tot, 1), "edited_objects": tot,
                    "others_keep_rate": keep / max(ktot, 1), "other_objects": ktot,
                    "background_change_255": float(np.mean(bg))}
        if gs == 7.5:
            res["_edit_images"] = imgs
        log(f"eval: edit g{gs:g} {res[key]}")
    res["_targets"] = targets
    res["_held"] = held
    res["wall_s"] = round(time.time() - t0)
    return res


def contact_strip(res: dict[str, Any], path: Path, k: int = 6, scale: int = 3) -> Path:
    """Rows: source render, generated-from-caption, colour-word edit (g 7.5), for k scenes."""
    from PIL import Image

    held: Held = res["_held"]
    rows = [np.concatenate(list(a[:k]), axis=1) for a in (held.images, res["_edit_images"])]
    img = np.concatenate(rows, axis=0)
    im = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate")
    ap.add_argument("folder")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--strip", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = evaluate(a.folder, a.n, a.steps)
    if a.strip:
        contact_strip(res, a.strip)
        print("targets:", [t[2] for t in res["_targets"][:6]])
    clean = {k: v for k, v in res.items() if not k.startswith("_")}
    print(json.dumps(clean, indent=2))
    if a.json:
        a.json.write_text(json.dumps(clean, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def clip_edit(model: str, seed: int, n_frames: int = 4, steps: int = 20, workdir: Path | None = None,
              target: str | None = None, **cfg_kw: Any) -> tuple[Any, str, np.ndarray, int, str]:
    """Edit a held-out scene clip with the project's pipeline (``p2v_fast.edit_video``): the
    largest object's colour word changed. Returns (clip, target prompt, edited frames [T,H,W,3],
    object index, target colour)."""
    import tempfile

    from p2v_fast import EditConfig, edit_video
    from p2v_fast.media.reader import read_frames

    clip = sc.render_clip(seed, n_frames, (64, 64))
    scene = clip.scene
    k = int(np.argmax([(clip.ids[0] == i + 1).sum() for i in range(len(scene.objects))]))
    ob = scene.objects[k]
    if target is None:
        taken = {o.colour for o in scene.objects if o.shape == ob.shape}
        far = sorted((c for c in sc.COLOURS if c not in taken),
                     key=lambda c: -min(abs(PALETTE_HUES[c] - PALETTE_HUES[ob.colour]),
                                        1 - abs(PALETTE_HUES[c] - PALETTE_HUES[ob.colour])))
        target = far[0]
    prompt = sc.caption_of(sc.with_colour(scene, k, target))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = sc.write_clip(clip, Path(tmp) / "clip")
        cfg = EditConfig(prompt=prompt, source_prompt=clip.caption, model=model, size=64, steps=steps,
                         device="cpu", cache_dir=Path(tmp) / "cache", **cfg_kw)
        out = Path(tmp) / "edit.mp4"
        edit_video(cfg, folder, out)
        edited = np.stack(list(read_frames(out)))
    return clip, prompt, edited, k, target


def edit_strip(model: str, seeds: list[int], path: Path, n_frames: int = 4, steps: int = 20, scale: int = 3) -> Path:
    """Contact strip: per seed, the source frames over the edited frames (p2v_fast.edit_video)."""
    from PIL import Image

    rows = []
    for s in seeds:
        clip, prompt, edited, _k, _target = clip_edit(model, s, n_frames, steps)
        print(f"seed {s}: '{clip.caption}' -> '{prompt}'")
        rows.append(np.concatenate(list(clip.frames), axis=1))
        rows.append(np.concatenate(list(edited), axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    img = np.concatenate(rows[:-1], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.Resampling.NEAREST).save(path)
    return path
