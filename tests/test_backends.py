"""Backends behind one interface: ONNX Runtime equals torch (per call and for a whole edit in each
latent-update mode), ``auto`` selection, the TensorRT runner's pure logic, and one-line errors
for missing, truncated, corrupt or mismatched engine folders (library and CLI).

Tolerances: per network call, max |ort - torch| <= 1e-4 of the output's range (measured ~2e-6).
Whole edit (tiny model, 3 frames at 64x64, 4 DDIM steps, inversion included): final latents
and decoded frames within 1e-3 absolute (measured ~3e-5; latents reach |x| ~ 5).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from p2v_fast.errors import BackendUnavailableError, EngineError
from p2v_fast.nets.backends import TorchBackend
from p2v_fast.nets.manifest import (
    Artifact,
    Machine,
    check_machine,
    check_size,
    describe_folder,
    read_manifest,
    rebuild_command,
    write_manifest,
)
from p2v_fast.nets.runtime import make_backend
from p2v_fast.nets.specs import ExportProfile, network_spec
from tests.helpers import SD2, SIZE, export_tiny, one_line, p2v

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EDIT_ATOL = 1e-3
CALL_REL = 1e-4




@pytest.fixture(scope="module")
def engines(tiny_engines) -> Path:
    """The session's fp32 tiny export (conftest's, read by tests/test_export.py too)."""
    return tiny_engines[0]


@pytest.fixture(scope="module")
def models(tiny_dir):
    """A model set of this module's own (backends re-wire the UNet's attention processors)."""
    from p2v_fast.weights.models import load_models

    return load_models("tiny")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    from p2v_fast.media.samples import make_sample_clip

    return make_sample_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", n_frames=3, size=(SIZE, SIZE))


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = CALL_REL) -> float:
    err = float((a.float() - b.float()).abs().max())
    assert err <= rel * max(float(b.float().abs().max()), 1e-6), err
    return err


# ------------------------------------------------------------------------------ equivalence


def test_onnxruntime_backend_matches_torch_per_call(engines, models) -> None:
    ort = make_backend("onnxruntime", models, engines)
    ref = TorchBackend(models)
    assert ort.name == "onnxruntime" and not ort.supports_grad and ort.device.type == "cpu"
    g = torch.Generator().manual_seed(0)
    sample, t = torch.randn(4, 5, 8, 16, generator=g), torch.tensor([981, 981, 21, 21])
    ehs = torch.randn(4, 77, 32, generator=g)
    with torch.no_grad():
        eps_r, feats_r = ref.unet(sample, t, ehs)
    eps_o, feats_o = ort.unet(sample, t, ehs)  # long timesteps are cast to the graph's fp32
    for a, b in zip([eps_o, *feats_o], [eps_r, *feats_r], strict=True):
        _close(a, b)
    refs = [torch.cat([f, f.flip(0)], dim=1) for f in feats_r]  # anchor || "previous"
    with torch.no_grad():
        eps_r, feats_r = ref.unet(sample, t, ehs, refs)
    eps_o, feats_o = ort.unet(sample, t, ehs, refs)
    for a, b in zip([eps_o, *feats_o], [eps_r, *feats_r], strict=True):
        _close(a, b)
    images = torch.rand(2, 3, SIZE, 2 * SIZE, generator=g) * 2 - 1
    with torch.no_grad():
        _close(ort.vae_encode(images), ref.vae_encode(images))
        lat = torch.randn(2, 4, 8, 8, generator=g)
        _close(ort.vae_decode(lat), ref.vae_decode(lat))
        px = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
        _close(ort.depth(px), ref.depth(px))
    assert ort.counter.unet_calls == 2 and ort.counter.unet_samples == 8


def test_batches_larger_than_max_batch_are_split(engines, models) -> None:
    ort = make_backend("onnxruntime", models, engines)
    g = torch.Generator().manual_seed(1)
    sample, t, ehs = torch.randn(5, 5, 8, 8, generator=g), torch.arange(5) * 100 + 1, torch.randn(5, 77, 32)
    whole, feats = ort.unet(sample, t, ehs)
    ort.max_batch = 2  # as a TensorRT profile would impose
    split, feats_split = ort.unet(sample, t, ehs)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    assert [f.shape for f in feats_split] == [f.shape for f in feats]


def _edit(models, clip: Path, out: Path, backend: str, mode: str, engines: Path | None):
    """Run the whole edit (inversion included, in its own cache); record every decoded latent."""
    from p2v_fast.config import EditConfig
    from p2v_fast.nets.runtime import Runtime
    from p2v_fast.pipeline import edit_video

    cfg = EditConfig(prompt="a red car", source_prompt="a car", model="tiny", device="cpu", dtype="fp32",
                     backend=backend, engines=engines, size=SIZE, steps=4, latent_update=mode,
                     cache_dir=out / f"cache-{backend}")
    rt_backend = make_backend(backend, models, engines)
    grad = rt_backend if rt_backend.supports_grad else TorchBackend(models)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    decode = rt_backend.vae_decode

    def recording_decode(latents: torch.Tensor) -> torch.Tensor:
        images = decode(latents)
        if latents.shape[0] == 1:  # the edit's frames (the inversion's reconstruction check decodes 2 at once)
            seen.append((latents.detach().clone(), images.detach().clone()))
        return images

    rt_backend.vae_decode = recording_decode  # type: ignore[method-assign]
    result = edit_video(cfg, clip, out / f"{backend}-{mode}.mp4", overwrite=True,
                        runtime=Runtime(models, rt_backend, grad))
    return seen, result


@pytest.mark.parametrize("mode", ["autograd", "detached", "off"])
def test_whole_edit_on_onnxruntime_equals_torch(engines, models, clip, tmp_path, mode) -> None:
    ref, ref_result = _edit(models, clip, tmp_path, "torch", mode, None)
    got, got_result = _edit(models, clip, tmp_path, "onnxruntime", mode, engines)
    assert len(ref) == len(got) == 3
    assert not got_result.inversion_cache_hit  # the inversion ran in ONNX Runtime too
    for (lat_r, img_r), (lat_o, img_o) in zip(ref, got, strict=True):
        assert float((lat_o - lat_r).abs().max()) <= EDIT_ATOL
        assert float((img_o - img_r).abs().max()) <= EDIT_ATOL
    if mode == "off":
        assert not got_result.stats.update_rms
    else:
        assert got_result.stats.update_rms  # the guided update did run
        r, o = ref_result.stats.mean_update_rms(), got_result.stats.mean_update_rms()
        assert r.keys() == o.keys() and all(abs(r[k] - o[k]) <= 1e-3 * max(r[k], 1e-6) for k in r)


# ------------------------------------------------------------------------------ auto


def test_auto_picks_onnxruntime_with_graphs_and_torch_without(engines, models, tmp_path) -> None:
    from p2v_fast.nets.runtime import choose_auto

    assert choose_auto(models, engines) == "onnxruntime"  # ONNX graphs only: no TensorRT engines listed
    assert make_backend("auto", models, engines).name == "onnxruntime"
    assert choose_auto(models, tmp_path / "nothing-here") == "torch"
    other = _copy(engines, tmp_path / "other-model")
    data = json.loads((other / "manifest.json").read_text())
    data["model"] = {"source": "someone/else", "digest": "0" * 16}
    (other / "manifest.json").write_text(json.dumps(data))
    assert choose_auto(models, other) == "torch"


# ------------------------------------------------------------------------------ bad engine folders


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _standin_trt():
    from tests.trt_standin import StandInCuda, StandInTrt

    return StandInTrt(StandInCuda())


def _standin(**kw) -> dict:
    """TensorRTBackend arguments for a machine without TensorRT or CUDA: stand-ins for both."""
    from tests.trt_standin import StandInCuda, StandInTrt

    cuda = StandInCuda()
    return {"trt": StandInTrt(cuda), "ops": cuda, **kw}


def test_missing_engine_folder_is_one_line(models, tmp_path) -> None:
    from p2v_fast.nets.backend_tensorrt import TensorRTBackend

    for make in (lambda f: make_backend("onnxruntime", models, f),
                 lambda f: TensorRTBackend(models, f, **_standin())):  # TensorRT usable: the folder is next
        with pytest.raises(EngineError) as err:
            make(tmp_path / "no-such-folder")
        msg = one_line(str(err.value))
        assert "does not exist" in msg and "p2v export" in msg


def test_truncated_onnx_is_one_line_with_rebuild_command(engines, models, tmp_path) -> None:
    folder = _copy(engines, tmp_path / "trunc")
    path = folder / "unet.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(EngineError) as err:
        make_backend("onnxruntime", models, folder)
    msg = one_line(str(err.value))
    assert "truncated" in msg and "unet.onnx" in msg
    assert f"p2v export --model tiny --height {SIZE} --width {SIZE}" in msg and "--format onnx" in msg


def test_corrupt_onnx_of_the_right_size_is_one_line(engines, models, tmp_path) -> None:
    folder = _copy(engines, tmp_path / "corrupt")
    path = folder / "vae_decoder.onnx"
    path.write_bytes(b"\x00garbage" * (path.stat().st_size // 8) + b"\x00" * (path.stat().st_size % 8))
    with pytest.raises(EngineError) as err:
        make_backend("onnxruntime", models, folder)
    msg = one_line(str(err.value))
    assert "cannot load" in msg and "vae_decoder.onnx" in msg and "p2v export" in msg


def test_corrupt_manifest_is_one_line(engines, models, tmp_path) -> None:
    folder = _copy(engines, tmp_path / "badjson")
    (folder / "manifest.json").write_text("{ not json")
    with pytest.raises(EngineError) as err:
        make_backend("onnxruntime", models, folder)
    assert "corrupt" in one_line(str(err.value))


def test_engines_of_another_model_are_refused(engines, models, tmp_path) -> None:
    folder = _copy(engines, tmp_path / "other")
    m = read_manifest(folder)
    m.model = type(m.model)("/data/my-sd2-depth", "f" * 16)
    write_manifest(folder, m)
    with pytest.raises(EngineError) as err:
        make_backend("onnxruntime", models, folder)
    msg = one_line(str(err.value))
    assert "'/data/my-sd2-depth', not 'tiny'" in msg and "p2v export --model tiny" in msg


def _fake_tensorrt_folder(engines: Path, dst: Path, built: Machine, truncate: str | None = None) -> Path:
    """The ONNX folder plus a manifest that lists engine files (placeholder bytes: they are never
    deserialized by these tests, which stop at the checks that come first)."""
    folder = _copy(engines, dst)
    m = read_manifest(folder)
    m.machine, m.options = built, {**m.options, "format": "tensorrt"}
    for name, entry in m.networks.items():
        plan = folder / f"{name}.plan"
        plan.write_bytes(b"\x00" * 1000)
        entry.engine = Artifact(plan.name, "k" * 16, 1000)
        entry.profile = {k: [list(s) for s in v] for k, v in entry.spec.profile_shapes(m.geometry, m.profile).items()}
    write_manifest(folder, m)
    if truncate:
        (folder / f"{truncate}.plan").write_bytes(b"\x00" * 10)
    return folder


def test_truncated_engine_file_is_one_line(engines, models, tmp_path) -> None:
    from p2v_fast.nets.backend_tensorrt import TensorRTBackend

    h100 = Machine("10.8.0", "9.0", "NVIDIA H100")
    folder = _fake_tensorrt_folder(engines, tmp_path / "trt", h100, truncate="unet")
    with pytest.raises(EngineError) as err:
        TensorRTBackend(models, folder, **_standin(machine=h100))
    msg = one_line(str(err.value))
    assert "unet.plan" in msg and "truncated" in msg and "--format tensorrt" in msg


def test_engines_for_another_gpu_are_refused_with_the_rebuild_command(engines, models, tmp_path) -> None:
    from p2v_fast.nets.backend_tensorrt import TensorRTBackend

    folder = _fake_tensorrt_folder(engines, tmp_path / "a100", Machine("10.3.0", "8.0", "NVIDIA A100"))
    with pytest.raises(EngineError) as err:
        TensorRTBackend(models, folder, **_standin(machine=Machine("10.8.0", "9.0", "NVIDIA H100")))
    msg = one_line(str(err.value))
    assert "TensorRT 10.3.0" in msg and "compute capability 8.0" in msg and "compute capability 9.0" in msg
    assert f"p2v export --model tiny --height {SIZE} --width {SIZE}" in msg and "--format tensorrt" in msg
    assert f"--engines {folder} --overwrite" in msg  # the options' own names, not their aliases
    # Same GPU architecture, another GPU: refused too (TensorRT tunes for the exact GPU)
    with pytest.raises(EngineError, match="NVIDIA A30"):
        TensorRTBackend(models, folder, **_standin(machine=Machine("10.3.0", "8.0", "NVIDIA A30")))
    # On a machine without TensorRT the refusal says that first, in one line.
    if not _trt_importable():
        with pytest.raises(BackendUnavailableError) as err2:
            TensorRTBackend(models, folder)
        assert one_line(str(err2.value)).startswith("TensorRT is not usable here: ")
    # p2v info tells the same story
    rows = dict(describe_folder(folder, Machine("10.8.0", "9.0", "NVIDIA H100")))
    assert "A100" in rows["  TensorRT"] and "this machine: TensorRT 10.8.0, NVIDIA H100" in rows["  TensorRT"]
    assert "unet.plan 0.0 MB not usable here: built on another machine" in rows["  unet"]


def _trt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


# ------------------------------------------------------------------------------ TensorRT runner logic


def test_select_profile_picks_the_profile_that_holds_every_input() -> None:
    from p2v_fast.nets.backend_tensorrt import select_profile

    spec = network_spec("unet", SD2, "fp16")
    small = spec.profile_shapes(SD2, ExportProfile(batch=(1, 2, 4), height=(256, 512, 512), width=(256, 512, 512)))
    large = spec.profile_shapes(SD2, ExportProfile(batch=(1, 2, 8), height=(512, 768, 1024),
                                                   width=(512, 768, 1024)))
    at = lambda b, h, w: spec.input_shapes(spec.dims(SD2, b, h, w))  # noqa: E731
    assert select_profile([small, large], at(2, 512, 512)) == 0
    assert select_profile([small, large], at(8, 512, 512)) == 1  # batch beyond the small one
    assert select_profile([small, large], at(2, 1024, 768)) == 1
    assert select_profile([small, large], at(2, 256, 1024)) is None  # 256 high only in small, 1024 wide only in large
    assert select_profile([small], at(16, 512, 512)) is None


def test_check_io_and_output_shapes() -> None:
    from p2v_fast.nets.backend_tensorrt import batch_and_size, check_io, output_shapes

    spec = network_spec("unet", SD2, "fp16")
    io = {t.name: ("input", t.dtype) for t in spec.inputs} | {t.name: ("output", t.dtype) for t in spec.outputs}
    check_io(spec, io)
    with pytest.raises(EngineError, match="missing"):
        check_io(spec, {k: v for k, v in io.items() if k != "feat_8"})
    with pytest.raises(EngineError, match="'sample'"):
        check_io(spec, {**io, "sample": ("input", "float32")})  # an fp32 engine for an fp16 spec
    shapes = spec.input_shapes(spec.dims(SD2, 2, 512, 768))
    out = output_shapes(spec, SD2, shapes)
    assert out["noise_pred"] == (2, 4, 64, 96) and out["feat_0"] == (2, 16 * 24, 1280)
    assert batch_and_size(spec, SD2, shapes) == (2, 512, 768)
    depth = network_spec("depth", SD2, "fp16")
    assert batch_and_size(depth, SD2, {"pixel_values": (3, 3, 384, 384)}) == (3, None, None)


def test_size_outside_the_profile_names_the_widening_command(engines) -> None:
    m = read_manifest(engines)
    assert m.profile.height == (SIZE, SIZE, 2 * SIZE)
    check_size(m, engines, 4, SIZE, 2 * SIZE)
    check_size(m, engines, None, 2 * SIZE, 2 * SIZE)  # None: any batch (split by the caller)
    with pytest.raises(EngineError) as err:
        check_size(m, engines, 2, SIZE, 4 * SIZE)
    msg = one_line(str(err.value))
    assert f"not {SIZE}x{4 * SIZE}" in msg
    assert f"--height {SIZE} --width {4 * SIZE} --min-size {SIZE} --max-size {4 * SIZE}" in msg
    with pytest.raises(EngineError, match="not batch 9"):
        check_size(m, engines, 9, SIZE, SIZE)
    static = type(m.profile)(batch=(4, 4, 4), height=(SIZE,) * 3, width=(SIZE,) * 3)
    m.profile, m.options = static, {**m.options, "static_batch": True}
    check_size(m, engines, 2, SIZE, SIZE)  # static-batch engines: smaller calls are padded
    with pytest.raises(EngineError, match="not batch 5"):
        check_size(m, engines, 5, SIZE, SIZE)
    with pytest.raises(EngineError, match=f"--height {2 * SIZE} --width {2 * SIZE} --max-batch 4 --static-batch"):
        check_size(m, engines, 4, 2 * SIZE, 2 * SIZE)  # a fixed-size folder is rebuilt at the new size


def test_the_cuda_graph_rebuild_command_builds_one_shape(engines) -> None:
    """What `--cuda-graph` suggests for dynamic engines is an export `p2v export` accepts and that
    builds static engines: one size (no --min-size/--max-size), no --opt-batch, --static-batch once."""
    from p2v_fast.nets.manifest import rebuild_command

    m = read_manifest(engines)
    m.profile = type(m.profile)(batch=(1, 2, 4), height=(SIZE, SIZE, 2 * SIZE), width=(SIZE, SIZE, 2 * SIZE))
    cmd = rebuild_command(m, engines, format="tensorrt", static_batch=True)
    assert cmd.count("--static-batch") == 1 and "--min-size" not in cmd and "--opt-batch" not in cmd
    assert f"--height {SIZE} --width {SIZE} --max-batch 4 --static-batch" in cmd


def test_onnxruntime_refuses_a_size_outside_the_exported_profile(engines, models) -> None:
    """As the tensorrt backend does (before: ONNX Runtime ran any size silently)."""
    ort = make_backend("onnxruntime", models, engines)
    with pytest.raises(EngineError) as err:
        ort.vae_encode(torch.rand(1, 3, 4 * SIZE, 4 * SIZE))
    msg = one_line(str(err.value))
    assert f"not {4 * SIZE}x{4 * SIZE}" in msg and f"--max-size {4 * SIZE}" in msg and "--format onnx" in msg
    ort.depth(torch.rand(1, 3, 32, 32))  # DPT runs at its one fixed size: nothing to refuse


def test_tensorrt_provider_gets_the_profile_explicitly(engines) -> None:
    from p2v_fast.nets.backend_onnx import tensorrt_provider_options

    m = read_manifest(engines)
    spec = m.networks["unet"].spec
    options = tensorrt_provider_options(0, engines / "cache", spec.profile_shapes(m.geometry, m.profile))
    assert options["trt_profile_min_shapes"].startswith("sample:1x5x8x8,timestep:1,encoder_hidden_states:1x77x32,"
                                                        "self_ref:1,ref_0:1x8x")
    assert options["trt_profile_opt_shapes"].startswith("sample:4x5x8x8,")  # opt batch = max batch
    assert options["trt_profile_max_shapes"].startswith("sample:4x5x16x16,")
    assert options["trt_engine_cache_enable"] and options["device_id"] == 0


def test_cli_edit_on_onnxruntime_refuses_a_size_outside_the_profile(engines, clip, tmp_path) -> None:
    result = p2v("edit", str(clip), "a red car", "-o", str(tmp_path / "o.mp4"), "--model", "tiny", "--size",
                 str(4 * SIZE), "--steps", "2", "--source-prompt", "a car", "--backend", "onnxruntime",
                 "--engines", str(engines))
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    last = [ln for ln in result.output.splitlines() if ln.strip()][-1]
    assert last.startswith("error: ") and f"not {4 * SIZE}x{4 * SIZE}" in last and "p2v export --model tiny" in last
    assert "encode" not in result.output  # refused before any work
    assert not (tmp_path / "o.mp4").exists()


def test_default_export_then_edit_a_landscape_and_a_portrait_clip(engines, tmp_path) -> None:
    """Issue 17 item 7: `p2v export` at the defaults (here --size 64, the tiny model's, graphs
    only on this CPU) then `p2v edit` of an 854x480 and a 480x854 clip, no other flags: their
    default crops (128x64 and 64x128) are inside the engines' profile. Before, the engines took
    64x64 only and both edits were refused."""
    from p2v_fast.media.samples import make_sample_clip

    folder = tmp_path / "eng"
    shutil.copytree(engines, folder)  # the session's graphs: the export finds them current
    result = p2v("export", "--model", "tiny", "--size", str(SIZE), "--format", "onnx", "--out", str(folder))
    assert result.exit_code == 0, result.output
    assert read_manifest(folder).profile.describe() == f"batch 1-8 at {SIZE}-{2 * SIZE} x {SIZE}-{2 * SIZE}"
    for size in ((854, 480), (480, 854)):
        clip = make_sample_clip(tmp_path / f"c{size[0]}.mp4", n_frames=2, size=size)
        out = tmp_path / f"o{size[0]}.mp4"
        result = p2v("edit", str(clip), "a red car", "-o", str(out), "--model", "tiny", "--size", str(SIZE),
                     "--steps", "2", "--source-prompt", "a car", "--backend", "onnxruntime", "--engines",
                     str(folder))
        assert result.exit_code == 0 and out.is_file(), result.output


def test_rebuild_command_and_machine_check() -> None:
    from p2v_fast.nets.manifest import Manifest, ModelId

    m = Manifest(model=ModelId("stabilityai/stable-diffusion-2-depth", "x"), precision="fp16", opset=18,
                 geometry=SD2, profile=ExportProfile(batch=(1, 2, 8), height=(256, 512, 768), width=(256, 512, 768)),
                 options={"model": "stabilityai/stable-diffusion-2-depth", "format": "tensorrt"},
                 machine=Machine("10.8.0", "9.0", "NVIDIA H100"))
    cmd = rebuild_command(m, Path("engines"))
    assert cmd == ("p2v export --model stabilityai/stable-diffusion-2-depth --height 512 --width 512 "
                   "--min-size 256 --max-size 768 --max-batch 8 --opt-batch 2 --dtype fp16 --format tensorrt "
                   "--engines engines --overwrite")  # the options' own names (were --precision, --out, --force)
    assert "--height 1024 --width 512 --min-size 256 --max-size 1024" in rebuild_command(m, Path("e"), height=1024)
    with pytest.raises(EngineError, match="ONNX graphs only"):  # no engines listed yet
        check_machine(m, Machine("10.8.0", "9.0"), Path("engines"))


# ------------------------------------------------------------------------------ CLI


def _assert_one_error_line(result, *needles: str) -> None:
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_cli_edit_with_a_missing_engine_folder(clip, tmp_path) -> None:
    result = p2v("edit", str(clip), "a red car", "-o", str(tmp_path / "o.mp4"), "--model", "tiny", "--size",
                 str(SIZE), "--steps", "2", "--source-prompt", "a car", "--backend", "onnxruntime",
                 "--engines", str(tmp_path / "missing"))
    _assert_one_error_line(result, "does not exist", "p2v export")


def test_cli_edit_with_a_truncated_graph(engines, clip, tmp_path) -> None:
    folder = _copy(engines, tmp_path / "t")
    (folder / "depth.onnx").write_bytes((folder / "depth.onnx").read_bytes()[:100])
    result = p2v("edit", str(clip), "a red car", "-o", str(tmp_path / "o.mp4"), "--model", "tiny", "--size",
                 str(SIZE), "--steps", "2", "--source-prompt", "a car", "--backend", "onnxruntime",
                 "--engines", str(folder))
    _assert_one_error_line(result, "truncated", "depth.onnx", "p2v export --model tiny")


def test_cli_edit_with_engines_for_another_gpu(engines, clip, tmp_path, monkeypatch) -> None:
    import p2v_fast.nets.backend_tensorrt as backend_tensorrt
    import p2v_fast.nets.system as system

    folder = _fake_tensorrt_folder(engines, tmp_path / "a100", Machine("10.3.0", "8.0", "NVIDIA A100"))
    monkeypatch.setattr(backend_tensorrt, "this_machine", lambda device=None: Machine("10.8.0", "9.0", "NVIDIA H100"))
    for module in (system, backend_tensorrt):  # TensorRT usable (a stand-in): the machine check is next
        monkeypatch.setattr(module, "require_tensorrt", lambda alternative: _standin_trt())
    from tests.trt_standin import StandInCuda

    monkeypatch.setattr(backend_tensorrt, "TorchCuda", lambda device: StandInCuda())  # a CUDA device, stood in
    result = p2v("edit", str(clip), "a red car", "-o", str(tmp_path / "o.mp4"), "--model", "tiny", "--size",
                 str(SIZE), "--steps", "2", "--source-prompt", "a car", "--backend", "tensorrt",
                 "--engines", str(folder))
    _assert_one_error_line(result, "compute capability 8.0", "--format tensorrt", "p2v export")


def _info(*args: str) -> str:
    """``p2v info`` output with the table's borders and wrapping removed (one line of text)."""
    result = p2v("info", *args)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").replace("┃", " ").split())


def test_cli_info_says_whether_each_engine_matches_this_machine_and_model(engines, tmp_path, monkeypatch) -> None:
    """Before: a row labelled 'engines engines' (for ./engines), the files of each
    network, and no word on the model. Now: per network and artifact, 'usable here' or why not."""
    import p2v_fast.nets.manifest as manifest_mod
    from p2v_fast.nets.manifest import engine_key

    _copy(engines, tmp_path / "engines")
    monkeypatch.chdir(tmp_path)
    out = _info("--engines", "engines")  # the case once mislabelled: ./engines
    assert "engines engines" not in out and "engine folder engines: fp32, opset 18" in out
    assert "model tiny: matches the model here" in out
    for name in ("unet", "vae_encoder", "vae_decoder", "depth"):
        assert f"{name} {name}.onnx" in out and f"{name}.onnx" in out
    assert out.count("MB usable here") == 4

    # TensorRT engines built on an H100, read on an A100, then on the H100 itself
    h100, a100 = Machine("10.8.0", "9.0", "NVIDIA H100"), Machine("10.8.0", "8.0", "NVIDIA A100")
    trt = _fake_tensorrt_folder(engines, tmp_path / "trt", h100)
    m = read_manifest(trt)
    for entry in m.networks.values():  # the keys a real build records
        assert entry.engine is not None and entry.onnx is not None
        entry.engine.key = engine_key(entry.onnx.key, entry.spec.profile_shapes(m.geometry, m.profile), h100)
    write_manifest(trt, m)
    monkeypatch.setattr(manifest_mod, "this_machine", lambda device=None: a100)
    out = _info("--engines", str(trt))
    assert "engines built with TensorRT 10.8.0, NVIDIA H100 (compute capability 9.0); this machine: " \
           "TensorRT 10.8.0, NVIDIA A100 (compute capability 8.0)" in out
    assert "unet.plan 0.0 MB not usable here: built on another machine" in out
    monkeypatch.setattr(manifest_mod, "this_machine", lambda device=None: h100)
    out = _info("--engines", str(trt))
    assert "this machine: the same" in out and out.count("MB usable here") == 8  # 4 graphs + 4 engines

    # another model: named, with the re-export command; a model not available here: said so
    out = _info("--engines", str(trt), "--model", str(tmp_path / "no-such-model"))
    assert "not checked: model" in out and "is not available here" in out
    other = _copy(engines, tmp_path / "other")
    m = read_manifest(other)
    m.model = type(m.model)("tiny", "0" * 16)
    write_manifest(other, m)
    out = _info("--engines", str(other))
    assert "exported from tiny, but tiny here is another model" in out and "re-export: p2v export --model tiny" in out
    assert out.count("not usable here: another model") == 4


# ------------------------------------------------------------------------------ GPU tiers


@pytest.mark.cuda
def test_onnxruntime_cuda_provider_binds_cuda_tensors(engines, tiny_dir) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("ONNX Runtime here has no CUDA provider (pip install onnxruntime-gpu)")
    from p2v_fast.weights.models import load_models

    cuda_models = load_models("tiny", device="cuda")
    ort = make_backend("onnxruntime", cuda_models, engines)
    assert ort.device.type == "cuda"
    ref = TorchBackend(cuda_models)
    sample = torch.randn(2, 5, 8, 8, device="cuda")
    t, ehs = torch.tensor([900, 10], device="cuda"), torch.randn(2, 77, 32, device="cuda")
    eps_o, feats_o = ort.unet(sample, t, ehs)
    with torch.no_grad():
        eps_r, feats_r = ref.unet(sample, t, ehs)
    assert eps_o.device.type == "cuda"
    for a, b in zip([eps_o, *feats_o], [eps_r, *feats_r], strict=True):
        _close(a, b, 1e-3)


@pytest.mark.tensorrt
def test_tensorrt_edit_equals_torch(engines, clip, tmp_path) -> None:
    """The whole edit on TensorRT engines (fp32, tiny) equals torch on the same GPU."""
    from export import ExportOptions, export_engines
    from p2v_fast.weights.models import load_models

    cuda_models = load_models("tiny", device="cuda")
    folder = tmp_path / "trt"
    export_engines(ExportOptions(model="tiny", out=folder, format="tensorrt", precision="fp32", height=SIZE,
                                 width=SIZE, max_batch=4), models=cuda_models)
    cuda_models = load_models("tiny", device="cuda")  # fresh: the export re-wired the processors
    for mode in ("detached", "off"):
        (tmp_path / f"r-{mode}").mkdir()
        (tmp_path / f"t-{mode}").mkdir()
        ref, _ = _edit(cuda_models, clip, tmp_path / f"r-{mode}", "torch", mode, None)
        got, _ = _edit(cuda_models, clip, tmp_path / f"t-{mode}", "tensorrt", mode, folder)
        for (lat_r, _), (lat_t, _) in zip(ref, got, strict=True):
            assert float((lat_t - lat_r).abs().max()) <= 1e-2  # TF32 kernels on the GPU


# ------------------------------------------------------------------------------ the inversion cache across backends


@pytest.fixture(scope="module")
def engines_fp16(tiny_dir, tmp_path_factory) -> Path:
    folder, _ = export_tiny(tmp_path_factory.getbasetemp(), "fp16")
    return folder


def test_inversion_cache_across_backends_and_precisions(engines, engines_fp16, models, clip, tmp_path) -> None:
    """The inversion is keyed on the runtime it ran on. Default (--invert-dtype fp32): torch fp32
    inverts itself; fp32 graphs invert on ONNX Runtime (their own entry); fp16 graphs invert on
    PyTorch in fp32, so they share torch's entry. --invert-dtype same: fp16 graphs invert on
    themselves, an entry of their own, never reused by an fp32 edit."""
    from p2v_fast.config import EditConfig
    from p2v_fast.nets.runtime import Runtime
    from p2v_fast.pipeline import invert_video

    cfg = EditConfig(model="tiny", size=SIZE, steps=3, source_prompt="a car", cache_dir=tmp_path / "cache")
    torch32 = Runtime(models, TorchBackend(models), None)
    torch32.grad_backend = torch32.backend
    ort32 = Runtime(models, make_backend("onnxruntime", models, engines), None)
    ort16 = Runtime(models, make_backend("onnxruntime", models, engines_fp16), None)
    assert ort16.backend.dtype == torch.float16

    def run(rt, invert_dtype="fp32"):
        inv = invert_video(cfg.replace(invert_dtype=invert_dtype), clip, runtime=rt).inverted
        return inv.cache_hit, inv.root, inv.runtime

    hit, torch_root, ran = run(torch32)
    assert not hit and ran == {"backend": "torch", "dtype": "float32", "device": "cpu"}
    hit, root, ran = run(ort32)
    assert not hit and root != torch_root and ran["backend"] == "onnxruntime" and ran["dtype"] == "float32"
    ort32_root = root
    calls = ort16.backend.counter.unet_calls
    hit, root, ran = run(ort16)
    assert hit and root == torch_root and ort16.backend.counter.unet_calls == calls  # fp16 graphs: torch fp32
    hit, root, ran = run(ort16, "same")
    assert not hit and root not in (torch_root, ort32_root) and ran["dtype"] == "float16"
    assert ort16.backend.counter.unet_calls > calls
    assert run(ort32, "same")[:2] == (True, ort32_root)
    assert run(torch32, "same")[:2] == (True, torch_root)
