"""The auxiliary networks of ``mini`` (training/aux_nets.py): the training loops run a few steps on
tiny configs, and the shipped depth estimator, captioner and CLIP do what they were trained for
on held-out scenes (seeds never trained on)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from p2v_fast.media.scenes import COLOURS, caption_of, random_scene, render_frame
from p2v_fast.weights import tiny
from training import aux_nets as aux

MINI = Path(aux.__file__).resolve().parents[1] / "p2v_fast" / "weights" / "mini"

TINY_DPT = tiny.DPT_CONFIG  # the tiny hybrid DPT at 32 x 32
TINY_TEXT = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=32)
TINY_VISION = dict(image_size=32, patch_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                   num_attention_heads=2)


@pytest.fixture(scope="module")
def scenes() -> aux.SceneSet:
    return aux.render_set(aux.TRAIN_SEED0, 3, 2, size=32)


def test_render_set_captions_and_order(scenes):
    assert scenes.frames.shape == (6, 32, 32, 3) and scenes.depth.shape == (6, 32, 32)
    for cap, objs, floor in zip(scenes.captions, scenes.objects, scenes.floors, strict=True):
        got, got_floor = aux.parse_caption(cap)
        assert got == [(o["colour"], o["shape"]) for o in objs] and got_floor == floor
    rng = np.random.default_rng(0)
    changed = aux.perturb_caption(scenes.captions[0], rng)
    assert changed != scenes.captions[0] and len(changed.split()) == len(scenes.captions[0].split())


def test_ssi_loss_ignores_scale_and_shift():
    t = torch.rand(2, 8, 8) + 0.1
    assert float(aux.ssi_mae(3.0 * t + 2.0, t)) < 1e-5
    assert float(aux.ssi_mae(-t, t)) > 1.0  # the order of depths is not free


def test_training_loops_run_on_tiny_configs(scenes, tmp_path):
    from training.tokenizer import build_scene_bert_vocab, build_scene_clip_tokenizer

    plan = aux.Plan(depth_steps=2, clip_steps=2, blip_steps=2, blip_steps2=1, blip_steps3=0,
                    depth_batch=2, clip_batch=4, blip_batch=4)
    logs: list[str] = []
    depth, summary = aux.train_depth(scenes, plan, tmp_path, logs.append, False, config=TINY_DPT)
    assert summary["steps"] == 2 and np.isfinite(summary["loss_last"])
    assert (tmp_path / "depth.ckpt.pt").is_file()
    # resuming a finished run does no more steps
    _, again = aux.train_depth(scenes, plan, tmp_path, logs.append, True, config=TINY_DPT)
    assert again["steps"] == 2
    held = aux.render_set(aux.HELDOUT_SEED0, 2, 1, size=32)
    m = aux.eval_depth(depth, aux.dpt_processor(32), held)
    assert np.isfinite(m["absrel_aligned_inverse_depth"]) and 0 <= m["pair_order_accuracy"] <= 1

    ctok = build_scene_clip_tokenizer(tmp_path / "ctok")
    clip, summary = aux.train_clip(scenes, ctok, plan, tmp_path, logs.append, False, TINY_TEXT, TINY_VISION, 16)
    assert np.isfinite(summary["loss_last"])
    from transformers import BlipProcessor, CLIPProcessor

    m = aux.eval_clip(clip, CLIPProcessor(image_processor=aux.clip_image_processor(32), tokenizer=ctok), held)
    assert 0 <= m["caption_top1"] <= 1

    btok = build_scene_bert_vocab(tmp_path / "btok")
    blip, summary = aux.train_blip(scenes, btok, plan, tmp_path, logs.append, False,
                                   dict(TINY_TEXT, max_position_embeddings=aux.BLIP_MAX_LEN), TINY_VISION)
    assert np.isfinite(summary["loss_last"])
    scores, captions = aux.eval_blip(blip, BlipProcessor(image_processor=aux.blip_image_processor(32),
                                                         tokenizer=btok), held)
    assert len(captions) == 2 and 0 <= scores["exact_caption"] <= 1


def test_caption_scores():
    s = aux.SceneSet(np.zeros((2, 4, 4, 3), np.uint8), np.ones((2, 4, 4), np.float32),
                     ["a red cube and a blue cone on a plain floor", "a cyan sphere on a dotted floor"],
                     [[{"colour": "red", "shape": "cube"}, {"colour": "blue", "shape": "cone"}],
                      [{"colour": "cyan", "shape": "sphere"}]], ["plain", "dotted"], np.arange(2))
    r = aux.caption_scores(["a red cube and a green cone on a plain floor", "a cyan sphere on a dotted floor"], s)
    assert r["exact_caption"] == 0.5 and r["colour"] == 2 / 3 and r["shape"] == 1.0 and r["floor_pattern"] == 1.0


# ------------------------------------------------------------------------------------------
# the shipped weights

shipped = pytest.mark.skipif(not (MINI / "depth_estimator").is_dir(), reason="mini's weights are not in the package")


def _heldout(seed: int):
    rng = np.random.default_rng(aux.HELDOUT_SEED0 + seed)
    scene = random_scene(rng, aux.CLIP_FRAMES)
    return scene, render_frame(scene, 0.0, (aux.IMAGE, aux.IMAGE))


@shipped
def test_shipped_depth_orders_near_and_far():
    from transformers import DPTForDepthEstimation

    from p2v_fast.weights.hub import image_processor_class

    model = DPTForDepthEstimation.from_pretrained(str(MINI / "depth_estimator"), dtype=torch.float32).eval()
    proc = image_processor_class("DPTImageProcessor").from_pretrained(str(MINI / "feature_extractor"))
    rng = np.random.default_rng(1)
    right = total = 0
    for k in range(4):
        _, f = _heldout(k)
        with torch.no_grad():
            pred = model(pixel_values=proc(images=[f.image], return_tensors="pt")["pixel_values"]).predicted_depth[0]
        assert pred.shape == f.depth.shape
        z, p = f.depth.ravel(), pred.numpy().ravel()
        u, v = rng.integers(0, z.size, 200), rng.integers(0, z.size, 200)
        keep = np.abs(z[u] - z[v]) > 0.25 * np.minimum(z[u], z[v])  # clearly apart in depth
        right += int(np.sum((p[u] > p[v])[keep] == (z[u] < z[v])[keep]))
        total += int(keep.sum())
    assert total > 100 and right / total > 0.9


@shipped
def test_shipped_captioner_names_the_colour():
    from p2v_fast.weights.models import _load_captioner

    model, processor = _load_captioner(MINI, torch.device("cpu"), torch.float32)
    right = 0
    for k in range(5):
        scene, f = _heldout(k)
        ids = model.generate(pixel_values=processor(images=f.image, return_tensors="pt")["pixel_values"],
                             max_new_tokens=30, do_sample=False, num_beams=1)
        caption = processor.decode(ids[0], skip_special_tokens=True).strip()
        words = set(caption.split())
        right += int({o.colour for o in scene.objects} <= words and not (words & set(COLOURS)) - {
            o.colour for o in scene.objects})
    assert right >= 4


@shipped
def test_shipped_clip_prefers_the_true_colour():
    from p2v_fast.quality.metrics import ClipScorer

    scorer = ClipScorer("mini")
    right = total = 0
    for k in range(5):
        scene, f = _heldout(k)
        img = scorer.image_embeds([f.image])
        words = caption_of(scene).split()
        pos = next(i for i, w in enumerate(words) if w in COLOURS)  # the first object's colour
        texts = [" ".join([*words[:pos], c, *words[pos + 1:]]) for c in COLOURS]
        best = list(COLOURS)[int((img @ scorer.text_embeds(texts).T).argmax())]
        right += int(best == words[pos])
        total += 1
    assert right >= 4
