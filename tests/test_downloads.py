"""Every download named, sized and fetched on purpose (docs/models.md); the captioner as an option;
--flow raft's torchvision. Nothing here touches the network: the hub is offline (HF_HUB_OFFLINE) or a
closed loopback port, and the hub cache is a temporary folder."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib
from helpers import one_line, one_line_error, p2v, sample_clip
from huggingface_hub import constants
from huggingface_hub.utils import filter_repo_objects

from p2v_fast.errors import InputError, ModelLoadError
from p2v_fast.text import size_text
from p2v_fast.weights import catalog, downloads, hub

ROOT = Path(__file__).parents[1]

# The repos' files, as the hub lists them (sizes in bytes): what p2v must fetch, and the
# duplicates it must not.
SD2_FILES = {
    "512-depth-ema.ckpt": 5_710_000_000, "512-depth-ema.safetensors": 5_710_000_000, "README.md": 9_000,
    "model_index.json": 600, "scheduler/scheduler_config.json": 400,
    "feature_extractor/preprocessor_config.json": 400,
    "tokenizer/merges.txt": 525_000, "tokenizer/vocab.json": 1_060_000,
    "tokenizer/special_tokens_map.json": 400, "tokenizer/tokenizer_config.json": 800,
    "unet/config.json": 1_000, "unet/diffusion_pytorch_model.safetensors": 3_460_000_000,
    "unet/diffusion_pytorch_model.bin": 3_460_000_000, "unet/diffusion_pytorch_model.fp16.safetensors": 1_730_000_000,
    "vae/config.json": 600, "vae/diffusion_pytorch_model.safetensors": 335_000_000,
    "vae/diffusion_pytorch_model.bin": 335_000_000, "vae/diffusion_pytorch_model.fp16.safetensors": 167_000_000,
    "text_encoder/config.json": 600, "text_encoder/model.safetensors": 1_360_000_000,
    "text_encoder/pytorch_model.bin": 1_360_000_000, "text_encoder/model.fp16.safetensors": 681_000_000,
    "depth_estimator/config.json": 9_000, "depth_estimator/model.safetensors": 490_000_000,
    "depth_estimator/pytorch_model.bin": 490_000_000,
}
CLIP_FILES = {
    "config.json": 4_500, "preprocessor_config.json": 300, "tokenizer.json": 2_220_000, "vocab.json": 961_000,
    "merges.txt": 525_000, "special_tokens_map.json": 400, "tokenizer_config.json": 900, "README.md": 8_000,
    "model.safetensors": 1_710_000_000, "pytorch_model.bin": 1_710_000_000, "tf_model.h5": 1_710_000_000,
    "flax_model.msgpack": 1_710_000_000,
}


@pytest.fixture
def empty_hub(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return sample_clip(tmp_path_factory.mktemp("clip"), n_frames=3, size=(64, 64), audio=False)


# ------------------------------------------------------------------------------ 1. named and sized


def test_size_text() -> None:
    assert [size_text(n) for n in (5_650_000_000, 990e6, 20.1e6, 1_710_000_000, 512, 0)] == [
        "5.65 GB", "990 MB", "20.1 MB", "1.71 GB", "512 B", "0 B"]


def test_docs_models_table_is_the_catalog() -> None:
    """docs/models.md names every download with its hub id (or URL), its `p2v download` group and
    its size, as the code states them; the README's usage links the page."""
    page = (ROOT / "docs" / "models.md").read_text()
    rows = [ln for ln in page.splitlines() if ln.startswith("| ") and "`" in ln][1:]  # under the header
    assert len(rows) == len(catalog.CATALOG)
    for entry, row in zip(catalog.CATALOG, rows, strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"`{entry.source}`" and cells[3] == f"`{entry.group}`", row
        assert cells[4] == size_text(entry.size), row
    assert f"Everything together: {size_text(sum(e.size for e in catalog.CATALOG))}" in page
    assert [size_text(e.size) for e in catalog.CATALOG] == ["5.65 GB", "990 MB", "1.71 GB", "20.1 MB"]
    assert "(docs/models.md)" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize(("entry", "files"), [(catalog.SD2_DEPTH, SD2_FILES), (catalog.CLIP_L14, CLIP_FILES)])
def test_only_the_files_p2v_loads_are_fetched(entry, files) -> None:
    """The allow_patterns keep the fp32 safetensors, configs and tokenizer files, and drop the
    .ckpt, .bin, fp16, TensorFlow and Flax copies; what they keep adds up to the size stated."""
    kept = set(filter_repo_objects(files, allow_patterns=list(entry.patterns)))
    assert not [f for f in kept if f.endswith((".ckpt", ".bin", ".h5", ".msgpack", ".md")) or ".fp16." in f]
    weights = {f for f in files if f.endswith(".safetensors") and "/" in f and ".fp16." not in f}
    if entry is catalog.CLIP_L14:
        weights = {"model.safetensors"}
    assert weights <= kept and {f for f in files if f.endswith((".json", ".txt"))} <= kept
    assert abs(sum(files[f] for f in kept) - entry.size) < 0.01 * entry.size


def test_a_first_download_says_what_and_how_big_and_refuses_what_cannot_fit(tmp_path, monkeypatch, capsys) -> None:
    import shutil
    from collections import namedtuple

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**13, 0, 10**12))
    hub.before_download(catalog.SD2_DEPTH.source)
    line = capsys.readouterr().err.strip()
    assert line.startswith("downloading 'stabilityai/stable-diffusion-2-depth' (Stable Diffusion 2 depth, 5.65 GB) "
                           f"into {tmp_path / 'hub'}") and "p2v download edit" in line
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**13, 0, 2 * 10**9))
    with pytest.raises(ModelLoadError) as e:
        hub.before_download(catalog.SD2_DEPTH.source)
    assert "does not fit: 5.65 GB to download" in one_line(str(e.value)) and "2 GB free" in str(e.value)


def test_first_use_fetches_the_catalog_files_with_snapshot_download(monkeypatch, capsys) -> None:
    """A hub model that is not cached: probe, the line, then snapshot_download with the catalog's
    allow_patterns (resumable, with progress), then the loader (which finds it cached)."""
    import huggingface_hub

    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_probe_hub", lambda *a, **k: None)
    monkeypatch.setattr(hub, "check_disk", lambda *a: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: calls.append((repo, kw["allow_patterns"])) or "/snap")
    tries = iter([RuntimeError("not cached"), "loaded"])

    def load(local_only: bool):
        got = next(tries)
        if isinstance(got, Exception):
            raise got
        return got, local_only

    assert hub.from_hub(catalog.BLIP_BASE.source, load) == ("loaded", False)
    assert calls == [(catalog.BLIP_BASE.source, list(catalog.BLIP_BASE.patterns))]
    assert "(BLIP base captioner, 990 MB)" in capsys.readouterr().err


def test_download_command(empty_hub, monkeypatch) -> None:
    """`p2v download`: offline, one line after saying what it would fetch; online, each group's
    entries through snapshot_download (hub) or the URL fetch (RAFT), and where they went."""
    r = p2v("download", "eval")
    assert "fetching 2 downloads, 1.73 GB at most: 'openai/clip-vit-large-patch14' (CLIP ViT-L/14, 1.71 GB)" \
        in r.stderr
    assert "offline mode (HF_HUB_OFFLINE) is on" in one_line_error(r)
    assert "edit, caption, eval, all" in one_line_error(p2v("download", "everything"))

    monkeypatch.delenv("HF_HUB_OFFLINE")
    fetched = []
    monkeypatch.setattr(downloads, "_probe_hub", lambda *a, **k: None)
    monkeypatch.setattr(hub, "check_disk", lambda *a: None)
    monkeypatch.setattr(downloads, "snapshot", lambda repo: fetched.append(repo) or Path(f"/snap/{repo}"))
    monkeypatch.setattr(downloads, "fetch_url_file", lambda url, folder, *a: fetched.append(url) or folder / "raft.pth")
    r = p2v("download", "caption", "eval")
    assert r.exit_code == 0, r.output
    assert fetched == [catalog.BLIP_BASE.source, catalog.CLIP_L14.source, catalog.RAFT_LARGE.source]
    assert f"{catalog.CLIP_L14.source}: /snap/{catalog.CLIP_L14.source}" in r.stdout


def test_info_lists_the_cached_weights(tmp_path, monkeypatch) -> None:
    cache = tmp_path / "hub"
    snap = cache / "models--p2v-test--cached-model" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}" * 500)
    (cache / "models--p2v-test--cached-model" / "refs").mkdir()
    (cache / "models--p2v-test--cached-model" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    r = p2v("info", "--json", tmp_path / "info.json")
    assert r.exit_code == 0, r.output
    rows = {row["component"]: row["status"] for row in json.loads((tmp_path / "info.json").read_text())}
    assert rows["hub cache"] == f"{cache}: 1 repo, 1 kB"
    assert rows["  p2v-test/cached-model"] == f"1 kB, {cache / 'models--p2v-test--cached-model'}"


def test_edit_offline_names_every_missing_download_before_any_model_loads(empty_hub, clip, tmp_path) -> None:
    r = p2v("edit", clip, "a swan", "-o", tmp_path / "o.mp4", "--size", "64")
    msg = one_line_error(r)
    assert msg.startswith("error: model 'stabilityai/stable-diffusion-2-depth' (Stable Diffusion 2 depth, 5.65 GB) "
                          "and captioner 'Salesforce/blip-image-captioning-base' (BLIP base captioner, 990 MB) are "
                          "not in the local Hugging Face cache and offline mode"), msg
    assert "p2v download edit caption" in msg and "--source-prompt" in msg
    msg = one_line_error(p2v("edit", clip, "a swan", "-o", tmp_path / "o.mp4", "--size", "64", "--source-prompt", "x"))
    assert "(Stable Diffusion 2 depth, 5.65 GB)" in msg and "p2v download edit" in msg and "captioner" not in msg


def test_eval_offline_names_clip_and_its_size(empty_hub, clip) -> None:
    msg = one_line_error(p2v("eval", clip, "a swan", "-o", clip))
    assert "model 'openai/clip-vit-large-patch14' (CLIP ViT-L/14, 1.71 GB) is not in the local" in msg
    assert "p2v download eval" in msg and msg.endswith("--clip-model tiny (random weights, for testing only)")


def test_edit_with_the_hub_unreachable_fails_at_once_naming_the_downloads(clip, tmp_path) -> None:
    """The hub a closed loopback port (a subprocess: huggingface_hub reads HF_ENDPOINT at import):
    one line, sizes included, no retries."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-m", "cli", "edit", str(clip), "a swan", "-o", str(tmp_path / "o.mp4"),
                           "--size", "64"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "(Stable Diffusion 2 depth, 5.65 GB)" in lines[0] and "(BLIP base captioner, 990 MB)" in lines[0]
    assert "the hub cannot be reached" in lines[0]


# ------------------------------------------------------------------------------ 2. the captioner


def test_a_missing_captioner_is_refused_before_the_model_loads(empty_hub, clip, tmp_path, monkeypatch) -> None:
    import p2v_fast.nets.runtime
    import p2v_fast.pipeline

    def refuse(cfg):
        raise AssertionError("a model was loaded")

    for module in (p2v_fast.nets.runtime, p2v_fast.pipeline):
        monkeypatch.setattr(module, "load_runtime", refuse)
    base = [clip, "a swan", "-o", tmp_path / "o.mp4", "--size", "64", "--model", "tiny"]
    t0 = time.perf_counter()
    msg = one_line_error(p2v("edit", *base, "--captioner", "Salesforce/blip-image-captioning-base"))
    assert time.perf_counter() - t0 < 30
    assert msg.startswith("error: captioner 'Salesforce/blip-image-captioning-base' (BLIP base captioner, 990 MB) is "
                          "not in the local Hugging Face cache and offline mode"), msg
    assert "p2v download caption" in msg and "--source-prompt" in msg and "--captioner" in msg
    msg = one_line_error(p2v("edit", *base, "--captioner", tmp_path / "no-such-captioner"))
    assert "no-such-captioner" in msg and "--captioner" in msg and "--source-prompt" in msg
    msg = one_line_error(p2v("invert", clip, "--model", "tiny", "--size", "64", "--captioner", "none"))
    assert msg == "error: --captioner none needs --source-prompt (the inversion prompt: what the input shows)"


def test_captioner_folder_is_used(tiny_dir, tiny_models) -> None:
    """--captioner FOLDER captions with that folder (here tiny's own, given explicitly), and the
    default for a folder model with a captioner/ is that captioner, offline."""
    import numpy as np

    from p2v_fast.weights.caption import caption_frame

    frame = np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)
    own = caption_frame(tiny_models, frame, max_new_tokens=6)
    given = caption_frame(tiny_models, frame, max_new_tokens=6, captioner=str(tiny_dir / "captioner"))
    assert own == given
    assert set(tiny_models._captioners) >= {None, str(tiny_dir / "captioner")}
    downloads.check_downloads(str(tiny_dir), None, None)  # its own captioner/: nothing to fetch


# ------------------------------------------------------------------------------ 3. evaluation installs what it uses


def test_the_eval_extra_installs_torchvision() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("torchvision") for req in extras["eval"])


def test_raft_without_torchvision_says_what_to_install_before_clip_loads(clip, monkeypatch, empty_hub) -> None:
    import torch

    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    msg = one_line_error(p2v("eval", clip, "a swan", "-o", clip, "--flow", "raft"))  # CLIP not cached: not reached
    assert "needs torchvision, which is not installed: pip install 'p2v-fast[eval]'" in msg
    assert "pip install 'torchvision==0.28.*' --index-url https://download.pytorch.org/whl/cpu" in msg
    assert msg.endswith("or use --flow dis")


def test_a_torchvision_that_does_not_load_is_one_line(tmp_path, monkeypatch) -> None:
    """PyPI's CUDA torchvision on a CPU torch fails at import with a RuntimeError, not an ImportError."""
    from p2v_fast.quality.metrics import make_flow

    fake = tmp_path / "tv" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "tv"))
    with pytest.raises(ModelLoadError) as e:
        make_flow("raft")
    msg = one_line(str(e.value))
    assert "torchvision is installed but does not load" in msg and "torchvision::nms" in msg and "[eval]" in msg


def _torchvision_loads() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision.models.optical_flow  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _torchvision_loads(), reason="torchvision not installed or not loadable with this torch: its "
                    "CPU build is on download.pytorch.org only, which CI cannot reach (docs/models.md)")
def test_raft_flow_runs_with_random_weights() -> None:
    import numpy as np
    from torchvision.models.optical_flow import Raft_Large_Weights

    from p2v_fast.quality.metrics import _RaftFlow

    assert Raft_Large_Weights.DEFAULT.url == catalog.RAFT_LARGE.source
    flow = _RaftFlow(pretrained=False)
    a = np.random.default_rng(0).integers(0, 255, (36, 44, 3), dtype=np.uint8)
    f = flow(a, a)
    assert f.shape == (36, 44, 2) and f.dtype == np.float32 and np.isfinite(f).all()


def test_catalog_errors_are_input_errors() -> None:
    with pytest.raises(InputError):
        downloads.download(["everything"])


def test_the_hub_is_asked_once_per_run(empty_hub, clip, monkeypatch) -> None:
    """Issue 26: `p2v invert` checks a hub model before torch loads, then its loader finds the hub
    already answered: one probe per run (the download itself is stopped here), and the next run
    asks again."""
    import huggingface_hub

    asked = []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo, **kw: asked.append(repo))

    def stop(repo: str) -> None:
        raise ModelLoadError(f"stopped before downloading {repo}")

    monkeypatch.setattr(hub, "before_download", stop)
    for run in (1, 2):
        r = p2v("invert", str(clip), "--model", "p2v-test/not-cached", "--source-prompt", "a ball", "--size", "64")
        assert "stopped before downloading p2v-test/not-cached" in one_line_error(r)
        assert asked == ["p2v-test/not-cached"] * run


def test_a_folder_whose_scheduler_predicts_v_is_refused_from_its_config(tmp_path) -> None:
    """Issue 26: the scheduler's prediction_type is read from scheduler_config.json before torch
    loads, in the loader's words."""
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    with pytest.raises(ModelLoadError, match=r"model folder '.*' predicts 'v_prediction' \(its scheduler's"):
        downloads.check_downloads(str(tmp_path), None, "a ball")
