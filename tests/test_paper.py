"""`--paper` (issue 26, item 6): the configuration of the paper's Table 2 as the authors' code runs
it, one flag away; options given beside it win; the authors' DDIM timestep grid."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2v_fast.config import PAPER, EditConfig, paper_options
from tests.helpers import one_line_error, p2v, sample_clip, write_jobs


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return sample_clip(tmp_path_factory.mktemp("paper"), n_frames=4, size=(96, 64), audio=False)


def _dry_run(*args: object) -> str:
    r = p2v("edit", *args, "--dry-run")
    assert r.exit_code == 0, r.output
    return r.stdout


def test_paper_sets_the_authors_configuration(clip) -> None:
    out = _dry_run(clip, "a swan", "--paper")
    assert out.startswith("--paper: latent-update detached, update-steps 26")
    assert "4 frames at 512x512 (stretch)" in out  # a 96x64 clip squashed to the paper's 512x512
    assert "fp32 on the GPU" in out and "inversion in fp32" in out
    assert "50 DDIM steps (authors timestep grid), guidance 7.5" in out
    assert "refs anchor+prev, latent update detached on the first 26 steps (delta 100" in out
    assert "given beside it" not in out
    # without --paper: the defaults, which differ from it
    plain = _dry_run(clip, "a swan")
    assert "(crop)" in plain and "fp16 on the GPU" in plain and "model timestep grid" in plain
    assert "latent update detached on the first 25 steps" in plain  # the form is the paper's; the steps are not


def test_options_given_beside_paper_win(clip) -> None:
    out = _dry_run(clip, "a swan", "--paper", "--dtype", "fp16", "--resize", "crop", "--update-steps", "25")
    assert "given beside it: --dtype, --resize, --update-steps" in out.splitlines()[0]
    assert "fp16 on the GPU" in out and "(crop)" in out and "on the first 25 steps" in out
    assert "detached" in out and "authors timestep grid" in out  # the rest of the preset still applies
    # given at its default value, it still wins over the preset
    assert "(crop)" in _dry_run(clip, "a swan", "--paper", "--resize", "crop")


def test_paper_options_are_editconfig_fields_and_valid() -> None:
    cfg = EditConfig(**paper_options())
    assert (cfg.latent_update, cfg.guided_steps, cfg.resize, cfg.dtype, cfg.timestep_grid) == (
        "detached", 26, "stretch", "fp32", "authors")
    assert set(paper_options({"dtype": "fp16", "size": 256})) == set(PAPER) - {"dtype", "size"}
    # the authors guide steps 0-25 whatever the number of steps: all of them below 26
    assert paper_options({"steps": 10})["update_steps"] == 10
    assert paper_options({"steps": 100})["update_steps"] == 26


def test_a_bad_timestep_grid_is_one_line(clip) -> None:
    assert "--timestep-grid must be one of model, authors" in one_line_error(
        p2v("edit", clip, "x", "--timestep-grid", "trailing", "--dry-run"))


def test_the_authors_grid_is_the_scheduler_with_steps_offset_zero() -> None:
    from diffusers import DDIMScheduler

    from p2v_fast.method.ddim import DDIMSchedule
    from p2v_fast.weights.sd2_depth import SCHEDULER_CONFIG

    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    model, authors = DDIMSchedule(scheduler, 50), DDIMSchedule(scheduler, 50, "authors")
    assert model.timesteps.tolist() == list(range(981, 0, -20))
    assert authors.timesteps.tolist() == list(range(980, -1, -20))
    # the authors' last step goes to final_alpha_cumprod = alphas_cumprod[0] (set_alpha_to_one False)
    assert float(authors.abar_prev[-1]) == pytest.approx(float(scheduler.alphas_cumprod[0]))
    assert float(authors.abar[-1]) == pytest.approx(float(scheduler.alphas_cumprod[0]))


def test_the_grid_keys_the_inversion_cache_and_the_default_key_is_unchanged(tiny_models) -> None:
    from p2v_fast.method.inversion_cache import cache_key

    runtime = {"backend": "torch"}
    base = EditConfig(prompt="x", model="tiny")
    default = cache_key(base, tiny_models, "d", "src", runtime)
    assert cache_key(base.replace(timestep_grid="authors"), tiny_models, "d", "src", runtime) != default
    # a key made before the option existed is the default grid's key (the cache stays valid)
    assert default == cache_key(base.replace(timestep_grid="model"), tiny_models, "d", "src", runtime)


def test_a_jobs_file_takes_paper_and_its_own_keys_win(tmp_path, clip) -> None:
    from p2v_fast.apps.batch import load_jobs

    (tmp_path / "c.mp4").write_bytes(clip.read_bytes())
    jobs = write_jobs(tmp_path, [{"input": "c.mp4", "prompt": "a"},
                                 {"input": "c.mp4", "prompt": "b", "dtype": "fp16"},
                                 {"input": "c.mp4", "prompt": "c", "paper": False}], {"paper": True, "device": "cpu"})
    a, b, c = (job.cfg for job in load_jobs(jobs))
    # the defaults' size (JOB_DEFAULTS: 64) and steps were given, so they win over the preset's 512 and 50
    assert (a.latent_update, a.timestep_grid, a.resize, a.dtype, a.size, a.steps, a.guided_steps) == (
        "detached", "authors", "stretch", "fp32", 64, 2, 2)
    assert b.dtype == "fp16" and b.timestep_grid == "authors"
    assert (c.latent_update, c.timestep_grid, c.resize) == ("detached", "model", "crop")
