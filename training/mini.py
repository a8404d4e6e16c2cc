"""Train the small ``mini`` SD2-depth pipeline on rendered scenes, and assemble its folder.

    python -m training.mini --out DIR [--resume] [--only data|vae|unet|assemble] [--dest FOLDER]

Stages (each resumable from its checkpoints in ``DIR``; a finished stage is skipped):

- ``data``: render the training frames (``DIR/data/train_64.npz``; training seeds only).
- ``vae``: ``AutoencoderKL`` (4 levels, scale factor 8) on random crops: L1 + L2 + 1e-6 KL,
  AdamW, cosine LR. Its ``scaling_factor`` is then set to 1/std of the encoded training set.
- ``unet``: the ``CLIPTextModel`` and the SD2-depth-layout ``UNet2DConditionModel`` trained
  jointly: epsilon prediction with SD2's scaled-linear betas, the depth input computed from the
  renderer's inverse depth as inference computes it from DPT, 10 % empty captions (for
  classifier-free guidance), min-SNR-5 loss weights, AdamW, cosine LR.
- ``assemble``: a ``StableDiffusionDepth2ImgPipeline`` folder in fp16 safetensors (``--dest``,
  default ``DIR/mini``), with the depth estimator, captioner and CLIP model taken from
  ``DIR/aux/`` where the auxiliary training put them, and ``RECIPE.json`` beside the weights.

Single-threaded by default (``--threads 1``): on a shared 2-core machine one thread with passive
OpenMP waits is what trains fastest. Deterministic for ``--seed``: every step's batch, noise and
timesteps come from a generator seeded by (seed, step), so a resumed run equals an unbroken one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from p2v_fast.weights.sd2_depth import SCHEDULER_CONFIG
from training import nets
from training.data import TRAIN_SEED0, build_dataset, depth_condition

STAGES = ("data", "vae", "unet", "vae-dec", "vae-dec2", "unet2", "assemble")


def _log_to(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    return log


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except Exception:
        return "unknown"


def _machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_at_end": list(os.getloadavg())}


def _update_recipe(out: Path, key: str, value: Any) -> None:
    p = out / "recipe.json"
    recipe = json.loads(p.read_text()) if p.is_file() else {}
    recipe[key] = value
    p.write_text(json.dumps(recipe, indent=2))


def _cosine(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def _save_ckpt(path: Path, **state: Any) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def to_pixels(images: np.ndarray):
    """uint8 [B,H,W,3] -> float [-1, 1] [B,3,H,W]."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# --------------------------------------------------------------------------------------
# VAE


def train_vae(out: Path, data: dict[str, np.ndarray], steps: int, batch: int = 16, crop: int = 32,
              lr: float = 1e-3, seed: int = 0, resume: bool = False, tiny: bool = False, log=print,
              ckpt_every_s: float = 180.0, decoder_from: Path | None = None):
    """Train the VAE; with ``decoder_from`` (a saved VAE), fine-tune only its decoder: the encoder,
    hence the latent space the UNet trains in, stays fixed."""
    import torch
    from diffusers import AutoencoderKL

    d = out / "vae"
    d.mkdir(parents=True, exist_ok=True)
    ckpt = d / (f"ckpt_dec{'' if decoder_from.name == 'final' else '2'}.pt" if decoder_from else "ckpt.pt")
    torch.manual_seed(seed)
    if decoder_from is not None:
        vae = AutoencoderKL.from_pretrained(str(decoder_from))
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
        train_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
        seed += 7
    else:
        vae = nets.build_vae(tiny)
        train_params = list(vae.parameters())
    opt = torch.optim.AdamW(train_params, lr=lr, weight_decay=0.01)
    start, hist, wall = 0, [], 0.0
    if resume and ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start, hist, wall = st["step"], st["hist"], st["wall"]
        log(f"vae: resumed at step {start}")
    tag = ("vae-dec" if decoder_from.name == "final" else "vae-dec2") if decoder_from else "vae"
    if decoder_from is not None:
        vae.encoder.eval()
    images = data["images"]
    n, h, w = images.shape[:3]
    vae.train()
    t_last = time.time()
    t0 = time.time() - wall
    for step in range(start, steps):
        g = np.random.default_rng([seed, 1, step])
        idx = g.integers(0, n, batch)
        ys = g.integers(0, h - crop + 1, batch)
        xs = g.integers(0, w - crop + 1, batch)
        flips = g.random(batch) < 0.5
        crops = np.stack([images[i, y:y + crop, x:x + crop] for i, y, x in zip(idx, ys, xs, strict=True)])
        crops[flips] = crops[flips, :, ::-1]
        x = to_pixels(np.ascontiguousarray(crops))
        for group in opt.param_groups:
            group["lr"] = _cosine(step, steps, lr, warmup=min(50, steps // 10 + 1))
        tg = torch.Generator().manual_seed(seed * 1_000_003 + step)
        if decoder_from is not None:
            with torch.no_grad():
                post = vae.encode(x).latent_dist
        else:
            post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=tg)
        rec = vae.decode(z).sample
        err = rec - x
        kl = post.kl().mean() / (crop * crop)
        loss = err.abs().mean() + err.pow(2).mean() + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append(loss.item())
        if (step + 1) % 25 == 0 or step + 1 == steps:
            el = time.time() - t0
            rate = el / (step + 1)
            log(f"{tag}: step {step + 1}/{steps} loss {np.mean(hist[-25:]):.4f} "
                f"{rate:.2f} s/step, eta {(steps - step - 1) * rate / 60:.1f} min")
        if time.time() - t_last > ckpt_every_s or step + 1 == steps:
            _save_ckpt(ckpt, model=vae.state_dict(), opt=opt.state_dict(), step=step + 1, hist=hist,
                       wall=time.time() - t0)
            t_last = time.time()
    wall = time.time() - t0
    vae.eval()
    return vae, hist, wall


def encode_latents(vae, images: np.ndarray, batch: int = 256):
    """VAE mean latents (unscaled) of every image, as inference's inversion takes them."""
    import torch

    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            out.append(vae.encode(to_pixels(images[s:s + batch])).latent_dist.mean)
    return torch.cat(out)


def vae_psnr(vae, images: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        x = to_pixels(images)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


# --------------------------------------------------------------------------------------
# text encoder + UNet


def make_tokenizer(out: Path):
    from training.tokenizer import build_scene_clip_tokenizer

    return build_scene_clip_tokenizer(out / "tokenizer_src")


def train_unet(out: Path, data: dict[str, np.ndarray], latents, tokenizer, steps: int, batch: int = 64,
               lr: float = 4e-4, seed: int = 0, resume: bool = False, tiny: bool = False, log=print,
               drop: float = 0.1, snr_gamma: float = 5.0, ckpt_every_s: float = 180.0, init_from: Path | None = None):
    """Train the text encoder and UNet jointly; with ``init_from`` (a finished ``unet/final``), a
    further cosine cycle from those weights with a fresh optimizer."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    d = out / "unet"
    d.mkdir(parents=True, exist_ok=True)
    ckpt = d / ("ckpt2.pt" if init_from else "ckpt.pt")
    torch.manual_seed(seed + 2)
    text_encoder = nets.build_text_encoder(tokenizer, tiny)
    torch.manual_seed(seed + 3)
    unet = nets.build_unet(tiny)
    if init_from is not None:
        unet = UNet2DConditionModel.from_pretrained(str(init_from / "unet"))
        text_encoder = CLIPTextModel.from_pretrained(str(init_from / "text_encoder"))
        seed += 11
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    start, hist, wall = 0, [], 0.0
    if resume and ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(st["unet"])
        text_encoder.load_state_dict(st["text_encoder"])
        opt.load_state_dict(st["opt"])
        start, hist, wall = st["step"], st["hist"], st["wall"]
        log(f"unet: resumed at step {start}")

    caps = [str(c) for c in data["captions"]]
    uniq = sorted(set(caps) | {""})
    cap_index = {c: i for i, c in enumerate(uniq)}
    tok = tokenizer(uniq, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    cap_ids = torch.tensor([cap_index[c] for c in caps])
    empty = cap_index[""]
    lat_hw = tuple(latents.shape[-2:])
    depth = depth_condition(data["inv_depth"].astype(np.float32), lat_hw)  # [N,1,h,w]
    n = len(caps)

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    abar = torch.cumprod(1 - betas, 0).float()
    snr = abar / (1 - abar)
    weight = torch.clamp(snr, max=snr_gamma) / snr  # min-SNR-gamma for epsilon prediction

    unet.train()
    text_encoder.train()
    t_last = time.time()
    t0 = time.time() - wall
    for step in range(start, steps):
        g = np.random.default_rng([seed, 2, step])  # (seed + 11 in a second cycle: new batches)
        idx = torch.from_numpy(g.integers(0, n, batch))
        flip = torch.from_numpy(g.random(batch) < 0.5)
        dropped = torch.from_numpy(g.random(batch) < drop)
        tg = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x0 = latents[idx]
        dep = depth[idx]
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        dep = torch.where(flip[:, None, None, None], dep.flip(-1), dep)
        # a horizontal flip swaps left and right, and captions name objects left to right: a flipped
        # sample keeps its caption only when that order does not matter (one object); else unflipped
        single = torch.tensor([" and " not in caps[int(i)] for i in idx])
        keep = ~flip | single
        x0 = torch.where(keep[:, None, None, None], x0, latents[idx])
        dep = torch.where(keep[:, None, None, None], dep, depth[idx])
        ci = torch.where(dropped, torch.full_like(cap_ids[idx], empty), cap_ids[idx])
        ids = tok[ci]
        t = torch.randint(0, 1000, (batch,), generator=tg)
        noise = torch.randn(x0.shape, generator=tg)
        a = abar[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for group in opt.param_groups:
            group["lr"] = _cosine(step, steps, lr, warmup=min(50 if init_from else 200, steps // 10 + 1))
        ehs = text_encoder(ids)[0]
        pred = unet(torch.cat([xt, dep], dim=1), t, encoder_hidden_states=ehs).sample
        per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        hist.append(per.mean().item())
        if (step + 1) % 25 == 0 or step + 1 == steps:
            el = time.time() - t0
            rate = el / (step + 1)
            log(f"unet: step {step + 1}/{steps} eps-mse {np.mean(hist[-50:]):.4f} "
                f"{rate:.2f} s/step, eta {(steps - step - 1) * rate / 60:.1f} min")
        if time.time() - t_last > ckpt_every_s or step + 1 == steps:
            _save_ckpt(ckpt, unet=unet.state_dict(), text_encoder=text_encoder.state_dict(), opt=opt.state_dict(),
                       step=step + 1, hist=hist, wall=time.time() - t0)
            t_last = time.time()
    wall = time.time() - t0
    unet.eval()
    text_encoder.eval()
    return unet, text_encoder, hist, wall


# --------------------------------------------------------------------------------------
# assembling the pipeline folder


def _placeholder_depth():
    """A random DPT-Hybrid (the tiny config) for when the trained one is not there yet."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation

    from p2v_fast.weights import tiny

    torch.manual_seed(3)
    return DPTForDepthEstimation(DPTConfig(**tiny.DPT_CONFIG)), tiny.dpt_image_processor(tiny.DPT_IMAGE_SIZE)


def assemble(out: Path, dest: Path, log=print, aux: Path | None = None) -> Path:
    """Write the fp16 pipeline folder ``dest`` from the trained parts in ``out`` (and ``out/aux``)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionDepth2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer, DPTForDepthEstimation

    from p2v_fast.weights.hub import image_processor_class

    vae_dir = next(p for p in (out / "vae" / n for n in ("final_dec2", "final_dec", "final"))
                   if (p / "config.json").is_file() or p.name == "final")
    vae = AutoencoderKL.from_pretrained(str(vae_dir))
    un_dir = out / "unet" / ("final2" if (out / "unet" / "final2" / "unet" / "config.json").is_file() else "final")
    unet = UNet2DConditionModel.from_pretrained(str(un_dir / "unet"))
    text_encoder = CLIPTextModel.from_pretrained(str(un_dir / "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(str(un_dir / "tokenizer"))
    aux = aux or out / "aux"
    placeholders = []
    if (aux / "depth_estimator").is_dir():
        depth = DPTForDepthEstimation.from_pretrained(str(aux / "depth_estimator"))
        fe = image_processor_class("DPTImageProcessor").from_pretrained(str(aux / "feature_extractor"))
    else:
        depth, fe = _placeholder_depth()
        placeholders.append("depth_estimator")
    pipe: Any = StableDiffusionDepth2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                            scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
                                            depth_estimator=depth, feature_extractor=fe)
    pipe.to(torch.float16)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # the slow tokenizer's files too (transformers 4 loads those)
        shutil.copy(out / "tokenizer_src" / name, tmp / "tokenizer" / name)
    for extra in ("captioner", "clip"):
        if (aux / extra).is_dir():
            shutil.copytree(aux / extra, tmp / extra)
    recipe = json.loads((out / "recipe.json").read_text()) if (out / "recipe.json").is_file() else {}
    for name in ("recipe.json", "aux_recipe.json", "RECIPE.json"):
        if (aux / name).is_file():
            recipe["aux"] = json.loads((aux / name).read_text())
    recipe["placeholders"] = placeholders
    recipe.setdefault("rebuild", "python -m training.mini --out DIR --aux AUX_DIR --dest p2v_fast/weights/mini")
    (tmp / "RECIPE.json").write_text(json.dumps(recipe, indent=2))
    for p in tmp.rglob("*"):
        if p.suffix in (".bin", ".pt", ".pkl", ".pth"):
            raise RuntimeError(f"pickle file in the assembled folder: {p}")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    log(f"assemble: {dest} ({size / 1e6:.2f} MB){' placeholders: ' + ', '.join(placeholders) if placeholders else ''}")
    return dest


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.mini", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="working folder (data, checkpoints, parts)")
    ap.add_argument("--dest", type=Path, default=None, help="pipeline folder to write (default OUT/mini)")
    ap.add_argument("--aux", type=Path, default=None,
                    help="folder of the auxiliary networks (depth_estimator/, feature_extractor/, captioner/, clip/);"
                         " default OUT/aux")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoints in OUT")
    ap.add_argument("--only", choices=STAGES, action="append", help="run only these stages (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-data", type=int, default=24000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--vae-steps", type=int, default=1400)
    ap.add_argument("--vae-dec-steps", type=int, default=0,
                    help="decoder-only fine-tuning after the VAE (the encoder, hence the UNet's latent space, fixed)")
    ap.add_argument("--vae-dec2-steps", type=int, default=0, help="then on whole frames")
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-crop", type=int, default=64)
    ap.add_argument("--unet-steps", type=int, default=6500)
    ap.add_argument("--unet-batch", type=int, default=64)
    ap.add_argument("--unet2-steps", type=int, default=0, help="a second cosine cycle from the UNet's final weights")
    ap.add_argument("--unet2-lr", type=float, default=2e-4)
    ap.add_argument("--unet-lr", type=float, default=4e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="tiny configs (tests)")
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = _log_to(out / "train.log")
    stages = args.only or list(STAGES)
    log(f"mini: stages {stages}, args {vars(args)}")
    size = (args.size, args.size)
    data_path = out / "data" / f"train_{args.size}.npz"
    data = None

    def get_data():
        nonlocal data
        if data is None:
            t = time.time()
            data = build_dataset(data_path, args.n_data, size, log=log)
            _update_recipe(out, "data", {"n": args.n_data, "size": list(size), "train_seeds":
                                         [TRAIN_SEED0, TRAIN_SEED0 + args.n_data - 1],
                                         "held_out": f"every seed below {TRAIN_SEED0}",
                                         "one frame per scene at a random time of a 16-frame clip": True,
                                         "load_s": round(time.time() - t, 1)})
        return data

    if "data" in stages:
        get_data()

    final_vae = out / "vae" / "final"
    if "vae" in stages and not (final_vae / "config.json").is_file():
        vae, hist, wall = train_vae(out, get_data(), args.vae_steps, args.vae_batch, args.vae_crop, seed=args.seed,
                                    resume=args.resume, tiny=args.tiny, log=log)
        lat = encode_latents(vae, get_data()["images"][:4096])
        scale = 1.0 / float(lat.std())
        vae.register_to_config(scaling_factor=scale)
        vae.save_pretrained(str(final_vae), safe_serialization=True)
        _update_recipe(out, "vae", {"config": {k: v for k, v in nets.VAE_CONFIG.items() if k != "scaling_factor"},
                                    "params": nets.n_params(vae), "steps": args.vae_steps, "batch": args.vae_batch,
                                    "crop": args.vae_crop, "loss": "L1 + L2 + 1e-6 KL",
                                    "optimizer": "AdamW 1e-3 cosine",
                                    "final_loss": float(np.mean(hist[-50:])), "wall_s": round(wall),
                                    "scaling_factor": scale, "machine": _machine()})
        log(f"vae: done in {wall / 60:.1f} min, scaling factor {scale:.4f}")

    final_dec = out / "vae" / "final_dec"
    if "vae-dec" in stages and not (final_dec / "config.json").is_file() and args.vae_dec_steps > 0:
        vae, hist, wall = train_vae(out, get_data(), args.vae_dec_steps, args.vae_batch, args.vae_crop, lr=5e-4,
                                    seed=args.seed, resume=args.resume, tiny=args.tiny, log=log,
                                    decoder_from=final_vae)
        vae.save_pretrained(str(final_dec), safe_serialization=True)
        held = get_data()["images"][-512:]
        _update_recipe(out, "vae_decoder_finetune", {
            "steps": args.vae_dec_steps, "batch": args.vae_batch, "crop": args.vae_crop,
            "what": "decoder + post_quant_conv only, encoder frozen (the UNet's latent space unchanged)",
            "optimizer": "AdamW 5e-4 cosine", "final_loss": float(np.mean(hist[-50:])), "wall_s": round(wall),
            "machine": _machine()})
        log(f"vae-dec: done in {wall / 60:.1f} min, psnr on 512 training frames {vae_psnr(vae, held):.2f}")

    final_dec2 = out / "vae" / "final_dec2"
    if "vae-dec2" in stages and not (final_dec2 / "config.json").is_file() and args.vae_dec2_steps > 0:
        vae, hist, wall = train_vae(out, get_data(), args.vae_dec2_steps, args.vae_batch, args.size, lr=3e-4,
                                    seed=args.seed + 1, resume=args.resume, tiny=args.tiny, log=log,
                                    decoder_from=final_dec)
        vae.save_pretrained(str(final_dec2), safe_serialization=True)
        _update_recipe(out, "vae_decoder_finetune_2", {
            "steps": args.vae_dec2_steps, "batch": args.vae_batch, "crop": args.size,
            "what": "decoder + post_quant_conv only, whole frames, from vae_decoder_finetune",
            "optimizer": "AdamW 3e-4 cosine", "final_loss": float(np.mean(hist[-50:])), "wall_s": round(wall),
            "machine": _machine()})
        log(f"vae-dec2: done in {wall / 60:.1f} min, psnr on 512 training frames "
            f"{vae_psnr(vae, get_data()['images'][-512:]):.2f}")

    final_unet = out / "unet" / "final"
    if "unet" in stages and not (final_unet / "unet" / "config.json").is_file():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(final_vae)).eval()
        lat_path = out / "data" / "latents.pt"
        if lat_path.is_file():
            latents = torch.load(lat_path)
        else:
            t = time.time()
            latents = encode_latents(vae, get_data()["images"]) * vae.config.scaling_factor
            torch.save(latents, lat_path)
            log(f"unet: encoded {len(latents)} latents in {time.time() - t:.0f} s, std {float(latents.std()):.3f}")
        tokenizer = make_tokenizer(out)
        unet, text_encoder, hist, wall = train_unet(out, get_data(), latents, tokenizer, args.unet_steps,
                                                    args.unet_batch, args.unet_lr, seed=args.seed,
                                                    resume=args.resume, tiny=args.tiny, log=log)
        unet.save_pretrained(str(final_unet / "unet"), safe_serialization=True)
        text_encoder.save_pretrained(str(final_unet / "text_encoder"), safe_serialization=True)
        tokenizer.save_pretrained(str(final_unet / "tokenizer"))
        _update_recipe(out, "unet+text_encoder", {
            "unet_config": {k: v for k, v in nets.UNET_CONFIG.items()}, "text_config": nets.TEXT_CONFIG,
            "unet_params": nets.n_params(unet), "text_params": nets.n_params(text_encoder),
            "steps": args.unet_steps, "batch": args.unet_batch,
            "loss": "epsilon MSE, min-SNR-5 weights, SD2 scaled-linear betas, 10% empty captions",
            "optimizer": f"AdamW {args.unet_lr} cosine, grad clip 1", "final_eps_mse": float(np.mean(hist[-100:])),
            "wall_s": round(wall), "machine": _machine()})
        log(f"unet: done in {wall / 60:.1f} min")

    final_unet2 = out / "unet" / "final2"
    if "unet2" in stages and not (final_unet2 / "unet" / "config.json").is_file() and args.unet2_steps > 0:
        latents = torch.load(out / "data" / "latents.pt")
        tokenizer = make_tokenizer(out)
        unet, text_encoder, hist, wall = train_unet(out, get_data(), latents, tokenizer, args.unet2_steps,
                                                    args.unet_batch, args.unet2_lr, seed=args.seed,
                                                    resume=args.resume, tiny=args.tiny, log=log, init_from=final_unet)
        unet.save_pretrained(str(final_unet2 / "unet"), safe_serialization=True)
        text_encoder.save_pretrained(str(final_unet2 / "text_encoder"), safe_serialization=True)
        tokenizer.save_pretrained(str(final_unet2 / "tokenizer"))
        _update_recipe(out, "unet+text_encoder_cycle2", {
            "steps": args.unet2_steps, "batch": args.unet_batch, "from": "unet+text_encoder (its final weights)",
            "optimizer": f"AdamW {args.unet2_lr} cosine (fresh), warmup 50, grad clip 1",
            "final_eps_mse": float(np.mean(hist[-100:])), "wall_s": round(wall), "machine": _machine()})
        log(f"unet2: done in {wall / 60:.1f} min")

    if "assemble" in stages:
        _update_recipe(out, "git_commit", _git_commit())
        assemble(out, args.dest or out / "mini", log=log, aux=args.aux)
    return 0


if __name__ == "__main__":
    sys.exit(main())
