"""What a run prints, read by a newcomer (issue 28 item 4): every number says what it is and
what it covers, an inversion error is flagged only where it is bad for the model in use, and
other libraries' chatter stays out of a normal run."""

from __future__ import annotations

import re

from tests.helpers import p2v

#: Lines other libraries print on their own (transformers' save bar, Ray's note on its defaults).
CHATTER = ("Writing model shards", "Token authentication", "it/s]")


def test_an_edit_says_what_each_number_is(tiny_edit) -> None:
    r, _ = tiny_edit
    out = r.output.replace("\n", " ")
    # the inversion's check: what it measures, and that the tiny model's huge value is expected
    assert re.search(r"frame 1 regenerated from its inverted noise is [0-9.]+ % RMS off its latent", out), out
    assert "expected with random weights (a trained model's is a few %)" in out
    # the guided update: its size in latent units over which steps, the ratio named and qualified
    # (the default, detached: no ratio to itself)
    assert re.search(r"guided latent update \(detached, steps 1-2 of 4\): moved the latents \S+ RMS", out), out
    assert "the detached form's" not in out and "autograd/detached" not in out
    # per frame: editing alone and with the inversion; the total's span, and the time in all
    assert re.search(r"edit +[0-9.]+ s: [0-9.]+ s/frame editing, [0-9.]+ s/frame with inversion", out), out
    assert re.search(r"total +[0-9.]+ s from loading the models to the files written; \d+ s in all with start-up",
                     out), out


def test_no_warning_about_a_caption_nobody_typed(tiny_edit, tiny_models) -> None:
    """The tiny captioner's word salad runs past CLIP's 77 tokens; the user typed none of it, so
    no 'longer than CLIP's' warning (a typed prompt still gets one: test_cli_edit)."""
    from p2v_fast.weights.prompts import dropped_part

    r, _ = tiny_edit
    caption = re.search(r"source prompt \(BLIP caption of frame 1\): '([^']*)'", r.output)
    assert caption and dropped_part(tiny_models, caption.group(1)), r.output  # it is past the limit
    assert "warning" not in r.output


def test_a_trained_models_inversion_is_judged_by_its_own_standard() -> None:
    from p2v_fast.method.inversion import describe_reconstruction

    good, bad = {"latent_rel_rms": 0.0377, "psnr_db": 40.6}, {"latent_rel_rms": 0.5, "psnr_db": 20.0}
    assert describe_reconstruction(good, "mini").endswith(": as expected for a trained model")
    assert "warning: high for a trained model" in describe_reconstruction(bad, "mini")
    assert "warning" not in describe_reconstruction(bad, "tiny")
    assert "expected with random weights" in describe_reconstruction(bad, "arch:sd2-depth")


def test_the_demo_line_says_what_its_seconds_cover(tmp_path) -> None:
    r = p2v("demo", "--model", "tiny", "--out", tmp_path, "--frames", "2", "--steps", "2")
    assert r.exit_code == 0, r.output
    last = r.output.strip().splitlines()[-1]
    assert re.match(r"edited 2 frames: [0-9.]+ s/frame editing, [0-9.]+ s/frame with inversion; [0-9.]+ s from "
                    r"loading the models to the files written; \d+ s in all with start-up: ", last), last
    assert not any(c in r.output for c in CHATTER), r.output


def test_eval_builds_the_tiny_clip_quietly(tiny_edit, own_cache) -> None:
    """Building the tiny CLIP (a fresh cache) prints no transformers progress bar."""
    _, folder = tiny_edit
    r = p2v("eval", folder / "out.mp4", "--source", folder / "clip.mp4", "--prompt", "a crochet swan",
            "--clip-model", "tiny")
    assert r.exit_code == 0, r.output
    assert list((own_cache / "models").glob("clip-tiny*")) and not any(c in r.output for c in CHATTER), r.output


def test_the_autograd_update_line_names_its_ratio_to_the_detached_form() -> None:
    """--latent-update autograd: the ratio to the detached form at the same latents, named, and
    qualified for a random-weight model."""
    import torch

    from p2v_fast.method.edit import EditStats

    stats = EditStats()
    for step, (full, detached) in enumerate(((0.02, 0.01), (0.006, 0.004))):
        stats.update_rms[step] = [torch.tensor(full)]
        stats.detached_rms[step] = [torch.tensor(detached)]
    line = stats.describe_update("autograd", 4, random=True)
    assert line.startswith("guided latent update (autograd, steps 1-2 of 4): moved the latents 0.02 RMS"), line
    assert "2x and 1.5x the detached form's (the authors' code) at the same latents, meaningless with random" in line
    assert "choosing --update-weight" in stats.describe_update("autograd", 4, random=False)
