"""ONNX export of the tiny model's networks (unet, vae_encoder, vae_decoder, depth): onnx.checker,
ONNX Runtime == PyTorch (all 10 UNet outputs, the 9 ref inputs), fp16 graphs, stage caching, specs,
profiles, keys, the CLI.

The export runs once per session (64x64, fp32) into ``<basetemp>/engines-tiny-fp32``: conftest's
``tiny_engines``, which ``tests/test_backends.py`` and ``tests/test_backend_tensorrt.py`` read too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest
import torch

from export import ExportOptions, export_engines
from export.onnx_export import CLEANERS, compare_outputs, graph_module, reference_outputs
from p2v_fast.errors import EngineError, ExportValidationError, InputError
from p2v_fast.nets.manifest import (
    EXPORT_VERSION,
    Machine,
    ModelId,
    engine_key,
    onnx_key,
    read_manifest,
    rebuild_command,
)
from p2v_fast.nets.specs import NETWORKS, ExportProfile, network_spec, sample_inputs
from tests.helpers import SD2, SIZE, export_tiny, p2v
from tests.helpers import one_line as _one_line

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ref_models(tiny_dir):
    from p2v_fast.weights.models import load_models

    return load_models("tiny")


# ------------------------------------------------------------------------------ export + validation


def test_every_network_exports_checks_and_matches_pytorch(tiny_engines) -> None:
    folder, report = tiny_engines
    manifest = read_manifest(folder)
    assert list(manifest.networks) == list(NETWORKS)
    assert manifest.precision == "fp32" and manifest.opset == 18 and manifest.model.source == "tiny"
    assert {r.network for r in report.rows} == set(NETWORKS)
    for name, entry in manifest.networks.items():
        assert entry.onnx is not None and entry.engine is None
        onnx.checker.check_model(str(folder / entry.onnx.file), full_check=True)
        assert entry.validation is not None
        assert entry.validation["rel"] <= entry.spec.tolerance, (name, entry.validation)
        graph = onnx.load(str(folder / entry.onnx.file), load_external_data=False)
        assert [i.name for i in graph.graph.input] == entry.spec.input_names
        assert [o.name for o in graph.graph.output] == entry.spec.output_names


@pytest.mark.parametrize("name", NETWORKS)
def test_graph_matches_pytorch_at_another_batch_and_size(tiny_engines, ref_models, name) -> None:
    """Dynamic axes really are dynamic: batch 3 at 128x64 (export traced batch 2 at 64x64)."""
    from p2v_fast.nets.backend_onnx import OnnxSession

    folder, _ = tiny_engines
    manifest = read_manifest(folder)
    spec, geometry = manifest.networks[name].spec, manifest.geometry
    session = OnnxSession(folder / f"{name}.onnx", spec, geometry, torch.device("cpu"))
    inputs = sample_inputs(spec, spec.dims(geometry, 3, 128, 64), seed=7)
    got = session.run(inputs)
    module = graph_module(name, ref_models)
    with torch.no_grad():
        out = module(*(inputs[n] for n in spec.input_names))
    want = dict(zip(spec.output_names, out if isinstance(out, tuple) else (out,), strict=True))
    if name == "unet":
        assert inputs["self_ref"].tolist() == [1.0, 0.0, 1.0]  # anchor-like and cross-frame samples
        assert len([n for n in spec.input_names if n.startswith("ref_")]) == 9
        assert len([n for n in spec.output_names if n.startswith("feat_")]) == 9
    worst = compare_outputs(spec, got, want)
    assert worst["rel"] < 1e-4, worst


def test_unet_graph_uses_its_refs_only_where_self_ref_is_0(tiny_engines) -> None:
    """The refs are live graph inputs, not constants frozen at export, and the selector is
    per sample: other refs change the cross-frame sample's output and leave the anchor's as is."""
    from p2v_fast.nets.backend_onnx import OnnxSession

    folder, _ = tiny_engines
    manifest = read_manifest(folder)
    spec, geometry = manifest.networks["unet"].spec, manifest.geometry
    session = OnnxSession(folder / "unet.onnx", spec, geometry, torch.device("cpu"))
    inputs = sample_inputs(spec, spec.dims(geometry, 2, SIZE, SIZE), seed=1)
    assert inputs["self_ref"].tolist() == [1.0, 0.0]
    a = session.run(inputs)["noise_pred"]
    inputs["ref_8"] = inputs["ref_8"] * -1.0
    b = session.run(inputs)["noise_pred"]
    assert float((a[1] - b[1]).abs().max()) > 1e-3  # cross-frame sample: its refs matter
    assert torch.equal(a[0], b[0])  # anchor-like sample: its refs are selected away


def test_one_unet_graph_serves_a_batch_of_anchor_and_cross_frame_samples(tiny_engines, ref_models) -> None:
    """ONNX Runtime's ``unet`` on a batch mixing anchor (self_ref 1, zero refs) and cross-frame
    samples equals PyTorch's plain self-attention UNet for the anchors and its cross-frame UNet
    for the others, each called on its own samples."""
    from p2v_fast.nets.attention import UNetWithFeatures
    from p2v_fast.nets.backend_onnx import OnnxSession

    folder, _ = tiny_engines
    manifest = read_manifest(folder)
    spec, geometry = manifest.networks["unet"].spec, manifest.geometry
    x = sample_inputs(spec, spec.dims(geometry, 4, SIZE, SIZE), seed=5)
    x["self_ref"] = torch.tensor([1.0, 1.0, 0.0, 0.0])  # one anchor (2 CFG branches), one other frame
    for k in range(9):
        x[f"ref_{k}"][:2] = 0.0  # what the edit loop sends for the anchor
    got = OnnxSession(folder / "unet.onnx", spec, geometry, torch.device("cpu")).run(x)
    wrapper = UNetWithFeatures(ref_models.unet)
    refs = [x[f"ref_{k}"] for k in range(9)]
    with torch.no_grad():
        anchor = wrapper(x["sample"][:2], x["timestep"][:2], x["encoder_hidden_states"][:2])
        other = wrapper(x["sample"][2:], x["timestep"][2:], x["encoder_hidden_states"][2:], *(r[2:] for r in refs))
    want = {n: torch.cat([a, o]) for n, a, o in zip(spec.output_names, anchor, other, strict=True)}
    worst = compare_outputs(spec, got, want)
    assert worst["rel"] < 1e-4, worst


def test_fp16_export_is_an_fp16_graph_and_validates(tiny_dir, tmp_path_factory, ref_models) -> None:
    folder, _ = export_tiny(tmp_path_factory.mktemp("fp16"), "fp16", ("unet", "depth"))
    manifest = read_manifest(folder)
    graph = onnx.load(str(folder / "unet.onnx"))
    types = {i.name: i.type.tensor_type.elem_type for i in graph.graph.input}
    assert types["sample"] == onnx.TensorProto.FLOAT16 and types["ref_0"] == onnx.TensorProto.FLOAT16
    assert types["timestep"] == types["self_ref"] == onnx.TensorProto.FLOAT  # fp32 in every precision
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    depth = onnx.load(str(folder / "depth.onnx"))  # DPT stays fp32 (its batch norms)
    assert depth.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    v = manifest.networks["unet"].validation
    assert v is not None and 0 < v["rel"] <= 2e-2, v  # fp16 vs fp16 PyTorch: ~3e-3

    # ... and against the fp32 model: the precision loss itself is ~1e-3 relative
    from p2v_fast.nets.backend_onnx import OnnxSession

    spec = manifest.networks["unet"].spec
    inputs = sample_inputs(spec, spec.dims(manifest.geometry, 2, SIZE, SIZE), seed=3)
    got = OnnxSession(folder / "unet.onnx", spec, manifest.geometry, torch.device("cpu")).run(inputs)
    with torch.no_grad():
        out = graph_module("unet", ref_models)(*(inputs[n].float() for n in spec.input_names))
    worst = compare_outputs(spec, got, dict(zip(spec.output_names, out, strict=True)))
    assert worst["rel"] < 2e-2


# ------------------------------------------------------------------------------ cleaning keeps the contract


@pytest.mark.parametrize("cleaner", CLEANERS)
def test_each_cleaning_path_keeps_the_graph_contract(tiny_dir, tmp_path, ref_models, cleaner) -> None:
    """Issue 17 item 1. Both cleaning paths, forced (Polygraphy's is the one a GPU user with
    onnx-graphsurgeon gets; CI installs it): every input and output keeps the spec's name, dtype
    and shape with its named dynamic axes, and the graph runs at another batch and size. Before,
    Polygraphy's ONNX Runtime shape inference fixed every ref_k token axis to 1 and ONNX Runtime's
    check raised a traceback ("Got invalid dimensions for input: ref_0 ... Got: 8 Expected: 1")."""
    from export.onnx_export import contract_problem, graph_io
    from p2v_fast.nets.backend_onnx import OnnxSession

    folder, _ = export_tiny(tmp_path, networks=("unet",), name=cleaner, cleaner=cleaner)
    manifest = read_manifest(folder)
    spec, geometry = manifest.networks["unet"].spec, manifest.geometry
    io = graph_io(onnx.load(str(folder / "unet.onnx"), load_external_data=False).graph)
    assert contract_problem(spec, io) is None
    for t in (*spec.inputs, *spec.outputs):  # the very axis names of the spec, restored where a tool lost them
        assert io[t.name][1:] == (t.dtype, t.shape), (t.name, io[t.name])
    assert io["ref_0"][2][1] == "m0"
    session = OnnxSession(folder / "unet.onnx", spec, geometry, torch.device("cpu"))
    inputs = sample_inputs(spec, spec.dims(geometry, 3, 2 * SIZE, SIZE), seed=2)
    want = reference_outputs(graph_module("unet", ref_models), spec, inputs)
    assert compare_outputs(spec, session.run(inputs), want)["rel"] < 1e-4


def test_a_cleaned_graph_that_drifted_from_the_spec_is_one_line(tmp_path) -> None:
    """What Polygraphy's ONNX Runtime shape inference did to ref_0 is refused by name; a symbolic
    dim where the spec fixes a size, or another name, gets the spec's axis back."""
    from onnx import TensorProto, helper

    from export.onnx_export import check_contract

    spec = network_spec("vae_decoder", SD2, "fp32")

    def graph(out_shape, in_shape=("B", 4, "h", "w"), dtype=TensorProto.FLOAT) -> Path:
        x = helper.make_tensor_value_info("latent", dtype, list(in_shape))
        y = helper.make_tensor_value_info("images", TensorProto.FLOAT, list(out_shape))
        model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["latent"], ["images"])], "g",
                                                    [x], [y]))
        path = tmp_path / "g.onnx"
        onnx.save(model, str(path))
        return path

    for bad, needle in (((("B", 3, "H", "W"), ("B", 1, "h", "w")), "input 'latent' has shape ['B', 1, 'h', 'w']"),
                        ((("B", 3, 512, "W"),), "output 'images' has shape ['B', 3, 512, 'W']"),
                        ((("B", 3, "H", "W"), ("B", 4, "h", "w"), TensorProto.FLOAT16), "'latent' is float16")):
        with pytest.raises(EngineError) as err:
            check_contract(graph(*bad), spec, "polygraphy")
        msg = _one_line(str(err.value))
        assert msg.startswith("vae_decoder: cleaning the graph (polygraphy) broke its contract") and needle in msg, msg
    path = graph(("B", "Mulimages_dim_1", "unk__2", "W"))
    check_contract(path, spec, "onnxscript")
    from export.onnx_export import graph_io

    assert graph_io(onnx.load(str(path)).graph)["images"] == ("output", "float32", ("B", 3, "H", "W"))


def test_the_default_cleaner_is_polygraphy_exactly_when_onnx_graphsurgeon_is_installed(monkeypatch) -> None:
    import importlib.util

    from export import onnx_export

    real = importlib.util.find_spec
    for installed, tool in ((True, "polygraphy"), (False, "onnxscript")):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, ok=installed: (real("onnx") if ok else None)
                            if name == "onnx_graphsurgeon" else real(name, *a))
        assert onnx_export.default_cleaner() == tool


# ------------------------------------------------------------------------------ TF32


def _tf32_error(path: Path, spec, geometry) -> float:
    """Worst relative output change of the graph at ``path`` when TF32 is emulated (ONNX Runtime, CPU)."""
    import onnxruntime as ort

    from tests.trt_standin import tf32_graph

    model = onnx.load(str(path))
    feeds = {n: x.numpy() for n, x in sample_inputs(spec, spec.dims(geometry, 2, SIZE, SIZE), seed=3).items()}
    exact, tf32 = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
                   for m in (model, tf32_graph(model)))
    return max(float(abs(a.astype("float64") - b).max() / max(abs(a).max(), 1e-6)) for a, b in zip(exact, tf32,
                                                                                                    strict=True))


def test_tf32_is_allowed_exactly_where_the_tolerance_covers_it(tiny_engines, tmp_path) -> None:
    """Issue 17 item 2. TensorRT enables TF32 for fp32 layers by default. With TF32 emulated (the
    inputs of every fp32 convolution and product rounded to a 10-bit mantissa), every fp32 network
    moves by ~1e-3, 10x its 1e-4 tolerance: its spec forbids TF32 (so its engine is built with the
    flag cleared, tests/test_backend_tensorrt.py). fp16 graphs have no fp32 product left: TF32 is
    allowed, within their 2e-2."""
    fp16, _ = export_tiny(tmp_path, "fp16", ("vae_decoder",))
    checked = []
    for folder in (tiny_engines[0], fp16):
        manifest = read_manifest(folder)
        for name, entry in manifest.networks.items():
            error = _tf32_error(folder / f"{name}.onnx", entry.spec, manifest.geometry)
            checked.append((name, entry.spec.precision, error))
            assert entry.spec.tf32 == (error <= entry.spec.tolerance), (name, entry.spec.precision, error)
    assert all(e > 5e-4 for n, p, e in checked if p == "fp32"), checked  # ~1e-3 measured
    assert [n for n, p, e in checked if p == "fp16"] == ["vae_decoder"]


def test_reference_runs_of_the_export_check_have_tf32_off(tiny_engines, ref_models, monkeypatch) -> None:
    """Issue 17 item 2: PyTorch's reference runs with TF32 off (cuDNN convolutions use it by default)
    and restored after; ONNX Runtime's CUDA provider gets use_tf32 0 for every reference session."""
    import onnxruntime as ort

    from export import onnx_export
    from p2v_fast.nets import backend_onnx
    folder, _ = tiny_engines
    manifest = read_manifest(folder)
    spec = manifest.networks["vae_decoder"].spec
    module = graph_module("vae_decoder", ref_models)
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, *args):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return module(*args)

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        inputs = sample_inputs(spec, spec.dims(manifest.geometry, 2, SIZE, SIZE))
        onnx_export.validate_graph(folder / "vae_decoder.onnx", spec, manifest.geometry, Spy(), inputs,
                                   torch.device("cpu"))
        assert seen == [(False, False)]
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    made = []
    monkeypatch.setattr(backend_onnx, "OnnxSession", lambda path, spec, geometry, device, providers: made.append(
        (device, providers)))
    onnx_export.reference_session(folder / "vae_decoder.onnx", spec, manifest.geometry, torch.device("cuda:1"))
    assert made == [(torch.device("cuda:1"), [("CUDAExecutionProvider", {"device_id": 1, "use_tf32": 0}),
                                              "CPUExecutionProvider"])]
    assert backend_onnx.providers_for(torch.device("cuda:0"))[0] == ("CUDAExecutionProvider", {"device_id": 0})


def test_stages_are_skipped_when_current_and_redone_with_force(tiny_engines, tmp_path) -> None:
    folder, _ = tiny_engines
    again = export_engines(ExportOptions(model="tiny", out=folder, format="onnx", precision="fp32", height=SIZE,
                                         width=SIZE, max_size=2 * SIZE, max_batch=4))
    assert [r.status for r in again.rows] == ["cached"] * len(NETWORKS)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    before = read_manifest(copy)
    forced = export_engines(ExportOptions(model="tiny", out=copy, format="onnx", precision="fp32", height=SIZE,
                                          width=SIZE, max_size=2 * SIZE, max_batch=4, networks=("vae_decoder",),
                                          force=True))
    assert [(r.network, r.status) for r in forced.rows] == [("vae_decoder", "exported")]
    after = read_manifest(copy)
    assert list(after.networks) == list(NETWORKS)  # the other networks stay listed
    assert after.networks["vae_decoder"].onnx.key == before.networks["vae_decoder"].onnx.key  # type: ignore[union-attr]


def test_reexport_removes_the_two_legacy_unet_graphs(tiny_engines, tmp_path) -> None:
    """A folder from before the one-graph contract held unet_anchor and unet_xframe (the same weights twice); exporting
    into it leaves only the one unet graph."""
    folder, _ = tiny_engines
    copy = tmp_path / "old"
    shutil.copytree(folder, copy)
    legacy = [copy / "unet_anchor.onnx", copy / "unet_xframe.onnx", copy / "unet_xframe.onnx.data",
              copy / "unet_anchor.plan"]
    for p in legacy:
        p.write_bytes(b"old")
    export_engines(ExportOptions(model="tiny", out=copy, format="onnx", precision="fp32", height=SIZE, width=SIZE,
                                 max_batch=4))
    assert not any(p.exists() for p in legacy)
    assert (copy / "unet.onnx").is_file() and "unet" in read_manifest(copy).networks


def test_validation_error_names_network_output_and_size() -> None:
    spec = network_spec("vae_decoder", SD2, "fp32")
    want = {"images": torch.ones(1, 3, 8, 8)}
    got = {"images": torch.ones(1, 3, 8, 8) + 0.01}
    with pytest.raises(ExportValidationError) as err:
        compare_outputs(spec, got, want)
    msg = _one_line(str(err.value))
    assert "vae_decoder" in msg and "'images'" in msg and "1.00e-02" in msg
    assert "ONNX Runtime vs PyTorch max abs diff 0.01" in msg  # what was compared with what


# ------------------------------------------------------------------------------ specs and profiles


def test_profile_shapes_at_sd2_sizes() -> None:
    opts = ExportOptions(height=512, width=768, min_size=256, max_size=1024, max_batch=8, opt_batch=2)
    profile = opts.profile()
    assert profile == ExportProfile(batch=(1, 2, 8), height=(256, 512, 1024), width=(256, 768, 1024))
    shapes = network_spec("unet", SD2, "fp16").profile_shapes(SD2, profile)
    assert shapes["sample"] == ((1, 5, 32, 32), (2, 5, 64, 96), (8, 5, 128, 128))
    assert shapes["timestep"] == shapes["self_ref"] == ((1,), (2,), (8,))
    assert shapes["encoder_hidden_states"] == ((1, 77, 1024), (2, 77, 1024), (8, 77, 1024))
    # ref_0: up_blocks.1 at latent/4, 1280 channels, anchor || previous = 2 N tokens
    assert shapes["ref_0"] == ((1, 2 * 8 * 8, 1280), (2, 2 * 16 * 24, 1280), (8, 2 * 32 * 32, 1280))
    assert shapes["ref_8"] == ((1, 2 * 32 * 32, 320), (2, 2 * 64 * 96, 320), (8, 2 * 128 * 128, 320))
    enc = network_spec("vae_encoder", SD2, "fp16").profile_shapes(SD2, profile)
    assert enc["images"] == ((1, 3, 256, 256), (2, 3, 512, 768), (8, 3, 1024, 1024))
    depth = network_spec("depth", SD2, "fp16").profile_shapes(SD2, profile)
    assert depth["pixel_values"] == ((1, 3, 384, 384), (2, 3, 384, 384), (8, 3, 384, 384))
    assert network_spec("depth", SD2, "fp16").inputs[0].dtype == "float32"  # DPT fp32 always
    fixed = ExportOptions(height=512, width=512, max_size=512).profile()
    assert fixed.fixed_size and fixed.describe() == "batch 1-8 at 512x512"


def test_the_default_profile_serves_the_default_crop_of_landscape_and_portrait_clips() -> None:
    """Issue 17 item 7: at --size 512 the default engines take 512 to 896 a side (16:9 either way
    round): the crops p2v edit makes of 854x480, 1920x1080, 1080x1920 (phone) and 640x480 clips all
    fit; one shape with --static-batch (CUDA graphs) or --max-size 512."""
    from p2v_fast.media.framing import working_size

    profile = ExportOptions().profile()
    assert profile.height == profile.width == (512, 512, 896) and profile.batch == (1, 8, 8)
    for source in ((854, 480), (1920, 1080), (1080, 1920), (640, 480), (480, 640), (512, 512)):
        w, h = working_size(*source, 512)
        assert profile.contains(8, h, w), (source, (w, h))
    assert ExportOptions(height=SIZE, width=SIZE).profile().height == (SIZE, SIZE, 2 * SIZE)
    assert ExportOptions(static_batch=True).profile().fixed_size
    assert ExportOptions(max_size=512).profile().fixed_size
    assert ExportOptions(exporter="dynamo").profile().fixed_size


def test_opt_batch_is_what_the_wavefront_sends_and_static_batch_fixes_it() -> None:
    """Default opt batch = max batch: with frames in flight the wavefront's calls are split into
    calls of max_batch samples, so that is the batch TensorRT should tune for (not 2)."""
    assert ExportOptions(max_batch=8).profile().batch == (1, 8, 8)
    assert ExportOptions(max_batch=32, opt_batch=16).profile().batch == (1, 16, 32)
    static = ExportOptions(max_batch=4, static_batch=True).profile()
    assert static.batch == (4, 4, 4) and static.describe() == "batch 4 at 512x512"
    with pytest.raises(InputError, match="--opt-batch"):
        ExportOptions(max_batch=4, opt_batch=8)
    with pytest.raises(InputError, match="--static-batch"):
        ExportOptions(max_batch=4, opt_batch=2, static_batch=True)


def test_bind_solves_axes_and_names_the_inconsistent_input() -> None:
    spec = network_spec("unet", SD2, "fp16")
    dims = spec.dims(SD2, 2, 512, 640)
    shapes = spec.input_shapes(dims)
    assert spec.bind(SD2, shapes) == dims
    assert spec.output_shapes(dims)["feat_3"] == (2, 32 * 40, 640)
    bad = dict(shapes, ref_3=(2, 100, 640))
    with pytest.raises(EngineError, match="'ref_3'"):
        spec.bind(SD2, bad)
    with pytest.raises(EngineError, match="missing"):
        spec.bind(SD2, {k: v for k, v in shapes.items() if k != "ref_8"})


def test_geometry_of_tiny_matches_feature_shapes(ref_models) -> None:
    from p2v_fast.nets.attention import feature_shapes
    from p2v_fast.nets.specs import geometry_of

    g = geometry_of(ref_models)
    assert g.n_layers == 9 and g.text_dim == 32 and g.depth_in == (32, 32)
    for hw in ((8, 8), (8, 16), (16, 24)):
        assert g.tokens(*hw) == [n for n, _ in feature_shapes(ref_models.unet, hw)]
        assert list(g.feature_channels) == [c for _, c in feature_shapes(ref_models.unet, hw)]


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"precision": "int8"}, "--dtype must be one of"),  # the option's own name (was its alias --precision)
        ({"format": "tflite"}, "--format"),
        ({"height": 500}, "500"),
        ({"min_size": 1024}, "--min-size 1024"),
        ({"max_size": 256}, "--max-size 256"),
        ({"max_batch": 0}, "--max-batch"),
        ({"networks": ("clip",)}, "'clip'"),
    ],
)
def test_export_options_quote_the_bad_value(kw, needle) -> None:
    with pytest.raises(InputError) as err:
        ExportOptions(**kw)
    assert needle in _one_line(str(err.value))


def test_cache_keys_change_with_everything_that_invalidates() -> None:
    spec = network_spec("unet", SD2, "fp16")
    model = ModelId("stabilityai/stable-diffusion-2-depth", "abc")
    base = onnx_key(spec, model, 18)
    assert base == onnx_key(spec, model, 18)
    assert base != onnx_key(spec, model, 17)
    assert base != onnx_key(network_spec("unet", SD2, "fp32"), model, 18)
    assert base != onnx_key(network_spec("vae_decoder", SD2, "fp16"), model, 18)
    assert base != onnx_key(spec, ModelId("other", "def"), 18)
    assert EXPORT_VERSION >= 1
    profile = spec.profile_shapes(SD2, ExportProfile())
    h100 = Machine("10.8.0", "9.0", "NVIDIA H100")
    e = engine_key(base, profile, h100)
    assert e == engine_key(base, profile, h100)
    assert e != engine_key(base, profile, Machine("10.8.0", "8.9", "NVIDIA L4"))
    assert e != engine_key(base, profile, Machine("11.0.0", "9.0", "NVIDIA H100"))
    assert e != engine_key(base, spec.profile_shapes(SD2, ExportProfile(batch=(1, 2, 4))), h100)
    assert e != engine_key("0" * 16, profile, h100)


# ------------------------------------------------------------------------------ exporters


def test_the_dynamo_exporter_is_offered_for_fixed_sizes_only() -> None:
    """torch.export specialises the UNet's height and width (torch 2.13, diffusers 0.42; measured:
    a dynamo graph traced at 64x64 refuses 128x64) and guards the batch below 64."""
    with pytest.raises(InputError, match="--exporter dynamo traces one frame size"):
        ExportOptions(exporter="dynamo", max_size=1024)
    with pytest.raises(InputError, match="below 64"):
        ExportOptions(exporter="dynamo", max_batch=64)
    with pytest.raises(InputError, match="--exporter"):
        ExportOptions(exporter="jit")
    spec = network_spec("unet", SD2, "fp16")
    model = ModelId("m", "abc")
    assert onnx_key(spec, model, 18, "dynamo") != onnx_key(spec, model, 18) == onnx_key(spec, model, 18, "torchscript")


@pytest.mark.slow  # the dynamo export of the tiny UNet takes ~30 s on 2 CPU cores
def test_dynamo_export_of_the_unet_validates(tiny_dir, tmp_path, ref_models) -> None:
    from p2v_fast.nets.backend_onnx import OnnxSession
    from p2v_fast.weights.models import load_models

    folder = tmp_path / "dyn"
    options = ExportOptions(model="tiny", out=folder, format="onnx", precision="fp32", height=SIZE, width=SIZE,
                            max_batch=4, networks=("unet",), exporter="dynamo")
    export_engines(options, models=load_models("tiny"))
    manifest = read_manifest(folder)
    spec, geometry = manifest.networks["unet"].spec, manifest.geometry
    assert manifest.networks["unet"].validation["rel"] < 1e-4  # type: ignore[index]
    x = sample_inputs(spec, spec.dims(geometry, 3, SIZE, SIZE), seed=4)  # another batch than traced
    got = OnnxSession(folder / "unet.onnx", spec, geometry, torch.device("cpu")).run(x)
    with torch.no_grad():
        want = dict(zip(spec.output_names, graph_module("unet", ref_models)(*(x[n] for n in spec.input_names)),
                        strict=True))
    assert compare_outputs(spec, got, want)["rel"] < 1e-4
    assert "--exporter dynamo" in rebuild_command(manifest, folder)


# ------------------------------------------------------------------------------ CLI


def test_cli_export_reports_cached_stages(tiny_engines) -> None:
    folder, _ = tiny_engines
    result = p2v("export", "--model", "tiny", "--size", str(SIZE), "--out", str(folder),
                 "--format", "onnx", "--precision", "fp32", "--max-batch", "4",
                 "--max-size", str(2 * SIZE))
    assert result.exit_code == 0, result.output
    assert "cached" in result.output and "unet.onnx" in result.output and "manifest" in result.output


def test_cli_export_tensorrt_without_tensorrt_is_one_clear_line(tmp_path) -> None:
    from p2v_fast.nets.system import tensorrt_status

    if tensorrt_status()[0]:
        pytest.skip("TensorRT is usable here; the refusal path is for machines without it")
    result = p2v("export", "--model", "tiny", "--size", str(SIZE), "--out", str(tmp_path / "e"),
                 "--format", "tensorrt")
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT is not usable here: "), result.output
    assert "--format onnx" in lines[0]
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------------ GPU tiers


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engines_match_pytorch(tiny_dir, tmp_path, precision) -> None:
    """Build the tiny engines and compare every network with PyTorch on the GPU."""
    from p2v_fast.nets.backend_tensorrt import TensorRTBackend
    from p2v_fast.nets.backends import TorchBackend
    from p2v_fast.weights.models import load_models

    dtype = torch.float16 if precision == "fp16" else torch.float32
    models = load_models("tiny", device="cuda", dtype=dtype)
    options = ExportOptions(model="tiny", out=tmp_path / "e", format="tensorrt", precision=precision, height=SIZE,
                            width=SIZE, min_size=SIZE, max_size=2 * SIZE, max_batch=4)
    report = export_engines(options, models=models)
    assert {r.stage for r in report.rows} == {"onnx", "tensorrt"}
    manifest = read_manifest(tmp_path / "e")
    for name, entry in manifest.networks.items():  # each engine was checked against ONNX Runtime
        assert entry.engine_validation is not None and entry.engine_validation["rel"] <= entry.spec.tolerance, name
    trt_backend = TensorRTBackend(models, tmp_path / "e")
    largest = max(r.device_memory_size for r in trt_backend.runners.values())
    assert trt_backend.activation_memory.numel() == largest  # one shared activation buffer
    torch_backend = TorchBackend(models)  # after the export: it re-wires the UNet's processors
    tol = 1e-3 if precision == "fp32" else 2e-2
    _compare_unet_calls(trt_backend, torch_backend, manifest, tol,
                        ((2, (SIZE, SIZE)), (3, (2 * SIZE, SIZE)), (6, (SIZE, 2 * SIZE))))  # 6 > max batch: split
    images = torch.rand(2, 3, SIZE, SIZE, device="cuda") * 2 - 1
    with torch.no_grad():
        lat_r = torch_backend.vae_encode(images)
    lat_t = trt_backend.vae_encode(images)
    assert float((lat_t - lat_r).abs().max()) <= tol * float(lat_r.abs().max())


def _compare_unet_calls(trt_backend, torch_backend, manifest, tol: float, calls) -> None:
    """unet calls mixing anchor (self_ref 1) and cross-frame samples: TensorRT equals PyTorch."""
    spec = manifest.networks["unet"].spec
    for b, (h, w) in calls:
        x = sample_inputs(spec, spec.dims(manifest.geometry, b, h, w), device="cuda", seed=b)
        refs = [x[f"ref_{k}"] for k in range(9)]
        eps_t, feats_t = trt_backend.unet(x["sample"], x["timestep"], x["encoder_hidden_states"], refs, x["self_ref"])
        with torch.no_grad():
            eps_r, feats_r = torch_backend.unet(x["sample"], x["timestep"], x["encoder_hidden_states"], refs,
                                                x["self_ref"])
        for a, r in zip([eps_t, *feats_t], [eps_r, *feats_r], strict=True):
            assert float((a.float() - r.float()).abs().max()) <= tol * float(r.float().abs().max())


@pytest.mark.tensorrt
def test_tensorrt_static_batch_engines_replay_a_cuda_graph(tiny_dir, tmp_path) -> None:
    """--static-batch engines with --cuda-graph: captured once, replayed; smaller calls padded."""
    from p2v_fast.nets.backend_tensorrt import TensorRTBackend
    from p2v_fast.nets.backends import TorchBackend
    from p2v_fast.weights.models import load_models

    models = load_models("tiny", device="cuda", dtype=torch.float16)
    options = ExportOptions(model="tiny", out=tmp_path / "e", format="tensorrt", precision="fp16", height=SIZE,
                            width=SIZE, max_batch=4, static_batch=True)
    export_engines(options, models=models)
    manifest = read_manifest(tmp_path / "e")
    assert manifest.profile.batch == (4, 4, 4)
    trt_backend = TensorRTBackend(models, tmp_path / "e", cuda_graph=True)
    torch_backend = TorchBackend(models)
    _compare_unet_calls(trt_backend, torch_backend, manifest, 2e-2, ((4, (SIZE, SIZE)), (2, (SIZE, SIZE)),
                                                                     (4, (SIZE, SIZE)), (7, (SIZE, SIZE))))
    assert trt_backend.runners["unet"]._replay is not None  # captured, and the later calls replayed it


def test_a_graphs_only_reexport_keeps_the_engines_that_are_still_current(tiny_engines, tmp_path) -> None:
    """`p2v export --format onnx` into a folder with engines: engines whose key still matches the
    (unchanged) graph, profile and recorded GPU stay listed; a stale one is deleted, not orphaned."""
    from p2v_fast.nets.manifest import Artifact, write_manifest

    folder = tmp_path / "eng"
    shutil.copytree(tiny_engines[0], folder)
    m = read_manifest(folder)
    built = Machine("10.8.0", "9.0", "NVIDIA H100")
    m.machine = built
    for name, entry in m.networks.items():
        assert entry.onnx is not None
        shapes = entry.spec.profile_shapes(m.geometry, m.profile)
        key = "stale" if name == "depth" else engine_key(entry.onnx.key, shapes, built)
        (folder / f"{name}.plan").write_bytes(b"\0" * 100)
        entry.engine = Artifact(f"{name}.plan", key, 100)
    write_manifest(folder, m)
    export_tiny(tmp_path, name="eng")  # every graph is current: nothing is exported again
    after = read_manifest(folder)
    kept = {name for name, e in after.networks.items() if e.engine is not None}
    assert kept == set(NETWORKS) - {"depth"}
    assert after.machine == built
    assert not (folder / "depth.plan").exists() and (folder / "unet.plan").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--out", "FILE"], "is a file, not a folder"),
    (["--size", "0"], "multiple of 64"),
])
def test_export_bad_out_and_size_are_one_line(tmp_path, args, message) -> None:
    (tmp_path / "f").write_text("not a folder")
    args = [str(tmp_path / "f") if a == "FILE" else a for a in args]
    r = p2v("export", "--model", "tiny", "--format", "onnx", *args, catch_exceptions=False)
    assert r.exit_code == 2, r.output
    assert _one_line(r.output.strip()).startswith("error:") and message in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_cleaning_needs_no_onnx_runtime(tmp_path, monkeypatch) -> None:
    """Issue 26 item 7: ``[tensorrt]`` installs Polygraphy and onnx-graphsurgeon but no ONNX Runtime,
    which Polygraphy's constant folding runs subgraphs in: without it the default cleaner is
    onnxscript, and one asked for polygraphy falls back to onnxscript, saying why; the graph is
    folded either way. (Before, both imported onnxruntime and failed.)"""
    import sys

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export import onnx_export

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])
    one = numpy_helper.from_array(np.ones(4, np.float32), "one")
    nodes = [helper.make_node("Add", ["one", "one"], ["two"]), helper.make_node("Mul", ["x", "two"], ["y"])]
    src = tmp_path / "raw.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], [one]),
                                opset_imports=[helper.make_opsetid("", 18)]), str(src))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(ImportError):
        import onnxruntime  # noqa: F401
    assert onnx_export.default_cleaner() == "onnxscript"
    for tool in (None, "polygraphy"):
        dst = tmp_path / f"{tool}.onnx"
        used = onnx_export.clean_graph(src, dst, tool)
        assert used == ("onnxscript" if tool is None else
                        "onnxscript (polygraphy's folding needs ONNX Runtime, not installed)")
        assert [n.op_type for n in onnx.load(str(dst)).graph.node] == ["Mul"]  # 1 + 1 folded


@pytest.mark.parametrize(("fmt", "install"), [("onnx", "pip install 'p2v-fast[onnx]'"),
                                              ("tensorrt", "pip install 'p2v-fast[onnx-gpu,tensorrt]'")])
def test_an_export_without_onnx_runtime_is_refused_before_any_work(tmp_path, monkeypatch, fmt, install) -> None:
    """Issue 26 item 7: every graph (and engine) is checked in ONNX Runtime, which `[tensorrt]` alone
    does not install: said in one line before the model loads and before the folder is made.
    (Before: after loading and tracing, "ONNX Runtime is not installed ...; use --backend torch".)"""
    import sys

    from p2v_fast.errors import BackendUnavailableError
    from p2v_fast.weights import models as models_mod

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    monkeypatch.setattr(models_mod, "load_models", lambda *a, **kw: pytest.fail("the model was loaded"))
    with pytest.raises(BackendUnavailableError) as err:
        export_engines(ExportOptions(model="tiny", out=tmp_path / "e", format=fmt, precision="fp32"))
    msg = str(err.value)
    assert msg.startswith("p2v export checks every graph") and "ONNX Runtime, which is not installed" in msg
    assert install in msg and "\n" not in msg and not (tmp_path / "e").exists()
