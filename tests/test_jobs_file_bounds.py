"""Jobs files that are hostile or odd (issue 27, item 9): alias bombs and deep nesting are bounded,
jobs are checked as `p2v edit` checks its options, a symlinked input's output goes beside the link."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from p2v_fast.media import samples
from tests.helpers import no_model_loads
from tests.helpers import p2v as _p2v


@pytest.fixture(scope="module")
def clip(tmp_path_factory, tiny_dir) -> Path:
    root = tmp_path_factory.mktemp("jobclip")
    return samples.make_sample_clip(root / "a.mp4", n_frames=2, size=(64, 64), with_audio=False)


def _one_line(r, message: str) -> None:
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert message in lines[0], r.output


BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
               for p, c in zip(["", *"abcdefgh"], "abcdefghi", strict=True)) + "jobs: *i\n"


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, monkeypatch) -> None:
    no_model_loads(monkeypatch)
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 500
    t0 = time.perf_counter()
    r = _p2v("batch", path)
    assert time.perf_counter() - t0 < 30  # 387 million values when expanded: never expanded
    _one_line(r, "aliases expand to more than 1,000,000 values")


def test_a_self_referring_alias_is_refused(tmp_path, monkeypatch) -> None:
    no_model_loads(monkeypatch)
    path = tmp_path / "loop.yaml"
    path.write_text("jobs: &j [*j]\n")
    _one_line(_p2v("batch", path), "refers to the value that holds it")


@pytest.mark.parametrize(("name", "text"), [
    ("deep.yaml", "jobs: " + "[" * 20000 + "]" * 20000 + "\n"),
    ("deep.json", '{"jobs": ' + "[" * 20000 + "]" * 20000 + "}"),
    ("deep40.yaml", "jobs: " + "[" * 40 + "]" * 40 + "\n"),  # parses, but is deeper than a jobs file is
])
def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path, monkeypatch, name, text) -> None:
    no_model_loads(monkeypatch)
    path = tmp_path / name
    path.write_text(text)
    _one_line(_p2v("batch", path), "nested deeper than 32 levels")


def _jobs(folder: Path, job: dict) -> Path:
    path = folder / "jobs.yaml"
    path.write_text(yaml.safe_dump({"jobs": [{"model": "tiny", "size": 64, "steps": 2, **job}]}))
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="tf32 is refused off CUDA; this machine has CUDA")
def test_tf32_inversion_off_cuda_is_refused_at_validation(clip, tmp_path, monkeypatch) -> None:
    no_model_loads(monkeypatch)
    r = _p2v("batch", _jobs(tmp_path, {"input": str(clip), "prompt": "x", "invert_dtype": "tf32"}))
    _one_line(r, "job 1: --invert-dtype tf32 is TF32 tensor-core math on a CUDA GPU")


def test_max_memory_takes_the_cli_form(clip, tmp_path, monkeypatch) -> None:
    from p2v_fast.apps.batch import load_jobs

    no_model_loads(monkeypatch)
    (job,) = load_jobs(_jobs(tmp_path, {"input": str(clip), "prompt": "x", "max_memory": "12GB"}))
    assert job.cfg.max_memory == 12 * 2**30
    (job,) = load_jobs(_jobs(tmp_path, {"input": str(clip), "prompt": "x", "max_memory": 2**30}))
    assert job.cfg.max_memory == 2**30
    _one_line(_p2v("batch", _jobs(tmp_path, {"input": str(clip), "prompt": "x", "max_memory": "lots"})),
              "max_memory: 'lots' is not a size")


def test_a_symlinked_inputs_default_output_goes_beside_the_link(clip, tmp_path, monkeypatch) -> None:
    from p2v_fast.apps.batch import load_jobs

    no_model_loads(monkeypatch)
    link = tmp_path / "link.mp4"
    link.symlink_to(clip)
    (job,) = load_jobs(_jobs(tmp_path, {"input": "link.mp4", "prompt": "x"}))
    assert job.output == tmp_path / "link.p2v.mp4"  # as `p2v edit link.mp4` names it, not beside the target
    assert json.loads(json.dumps(job.spec()))["input"] == str(link)
