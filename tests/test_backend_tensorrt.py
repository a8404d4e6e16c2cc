"""The TensorRT runner's own logic, on the CPU, against a recording stand-in for TensorRT's engine
and context and for the CUDA side (``tests/trt_standin.py``): every bound address is a 256-byte
aligned buffer start, shapes are set before addresses, split batches come back in order, the
engine stream is ordered with torch's, the shared activation memory is the largest engine's size,
a CUDA graph is captured only for static shapes, and every refused call is a clear error. Also
the builder's logic (parser errors, timing cache), the export's engine validation step, and the
CLI's answer when TensorRT is not usable here.

These tests check our logic, not TensorRT: the ``tensorrt`` tier (tests/test_export.py,
tests/test_backends.py) runs the real thing on a GPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from p2v_fast.errors import EngineError, ExportValidationError
from p2v_fast.nets.backend_tensorrt import ALIGNMENT, TensorRTBackend
from p2v_fast.nets.manifest import Artifact, Machine, read_manifest, write_manifest
from p2v_fast.nets.specs import ExportProfile
from tests.helpers import SIZE, p2v
from tests.trt_standin import CAPTURE_INVALIDATED, StandInCuda, StandInTrt, per_sample_value

pytestmark = pytest.mark.usefixtures("one_torch_thread")

H100 = Machine("10.8.0", "9.0", "NVIDIA H100 80GB HBM3")


@pytest.fixture(scope="module")
def onnx_folder(tiny_engines) -> Path:
    folder = tiny_engines[0]  # the session's export (conftest's)
    _TINY_GEOMETRY.update(read_manifest(folder).geometry.to_dict())
    return folder


def engine_folder(onnx_folder: Path, dst: Path, profile: ExportProfile | None = None) -> Path:
    """The tiny ONNX folder plus stand-in engines built by ``build_engine`` from its graphs with
    each network's profile, as ``p2v export --format tensorrt`` lists them."""
    from export.tensorrt_build import build_engine

    shutil.copytree(onnx_folder, dst)
    m = read_manifest(dst)
    m.machine, m.options = H100, {**m.options, "format": "tensorrt"}
    if profile is not None:
        m.profile = profile
        m.options["static_batch"] = profile.batch[0] == profile.batch[2]
    trt = StandInTrt(StandInCuda(), version=H100.tensorrt)
    for name, entry in m.networks.items():
        shapes = entry.spec.profile_shapes(m.geometry, m.profile)
        plan = dst / f"{name}.plan"
        build_engine(dst / f"{name}.onnx", plan, shapes, tf32=entry.spec.tf32, trt=trt)
        entry.engine = Artifact(plan.name, "k" * 16, plan.stat().st_size)
        entry.profile = {k: [list(s) for s in v] for k, v in shapes.items()}
    write_manifest(dst, m)
    return dst


def make(models, folder: Path, cuda: StandInCuda | None = None, **kw) -> tuple[TensorRTBackend, StandInTrt]:
    cuda = cuda or StandInCuda()
    trt = StandInTrt(cuda, refuse=kw.pop("refuse", ()), refuse_in_capture=kw.pop("refuse_in_capture", ()),
                     version=H100.tensorrt)
    return TensorRTBackend(models, folder, machine=H100, trt=trt, ops=cuda, **kw), trt


def unet_inputs(batch: int, seed: int = 0) -> dict:
    """Inputs of the tiny model's unet at 64x64 (random refs; self_ref 1 for every third sample)."""
    from p2v_fast.nets.specs import Geometry

    g = torch.Generator().manual_seed(seed)
    geometry = Geometry.from_dict(_TINY_GEOMETRY)
    tokens = geometry.tokens(SIZE // 8, SIZE // 8)
    return {
        "sample": torch.randn(batch, 5, SIZE // 8, SIZE // 8, generator=g),
        "timestep": torch.arange(batch, dtype=torch.float32) * 10 + 1,
        "encoder_hidden_states": torch.randn(batch, 77, geometry.text_dim, generator=g),
        "self_ref": (torch.arange(batch) % 3 == 0).float(),
        "refs": [torch.randn(batch, 2 * n, c, generator=g) for n, c in zip(tokens, geometry.feature_channels,
                                                                          strict=True)],
    }


_TINY_GEOMETRY: dict = {}


def call_unet(backend: TensorRTBackend, x: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return backend.unet(x["sample"], x["timestep"], x["encoder_hidden_states"], x["refs"], x["self_ref"])


def expected(x: dict) -> torch.Tensor:
    """What the stand-in engine computes per sample: the sum of every input row."""
    feeds = {"sample": x["sample"], "timestep": x["timestep"], "encoder_hidden_states": x["encoder_hidden_states"],
             "self_ref": x["self_ref"], **{f"ref_{k}": r for k, r in enumerate(x["refs"])}}
    return per_sample_value(feeds)


def calls(log: list, kind: str, network: str = "unet") -> list[tuple]:
    return [e for e in log if e[0] == kind and e[1] == network]


# ------------------------------------------------------------------------------ buffers


def test_split_batches_come_back_in_order(tiny_models, onnx_folder, tmp_path) -> None:
    backend, trt = make(tiny_models, engine_folder(onnx_folder, tmp_path / "e"))
    assert backend.max_batch == 4
    x = unet_inputs(9)  # 9 > the profile's 4: calls of 4, 4 and 1 samples
    eps, feats = call_unet(backend, x)
    want = expected(x)
    assert len(calls(trt.log, "execute_async_v3")) == 3
    torch.testing.assert_close(eps[:, 0, 0, 0].double(), want, rtol=1e-6, atol=1e-3)
    for f in feats:
        torch.testing.assert_close(f[:, 0, 0].double(), want, rtol=1e-6, atol=1e-3)
    assert eps.shape == (9, 4, SIZE // 8, SIZE // 8) and not torch.isnan(eps).any()


def test_every_bound_address_is_an_aligned_buffer_start(tiny_models, onnx_folder, tmp_path) -> None:
    """Split batches are copied into the runner's own buffers: no slice of the caller's tensors
    (e.g. ``timestep[4:]`` at +16 bytes) is ever bound."""
    cuda = StandInCuda()
    backend, trt = make(tiny_models, engine_folder(onnx_folder, tmp_path / "e"), cuda)
    x = unet_inputs(9)
    call_unet(backend, x)
    backend.vae_decode(torch.randn(6, 4, SIZE // 8, SIZE // 8))
    bound = [e[3] for e in trt.log if e[0] == "set_tensor_address"]
    assert bound and all(a % ALIGNMENT == 0 for a in bound)
    starts = {a for a, _ in cuda.allocated}
    assert set(bound) <= starts  # the start of an allocation, never an offset into one
    caller = {x["sample"].data_ptr(), x["timestep"].data_ptr(), x["self_ref"].data_ptr()}
    assert not set(bound) & caller


def test_a_misaligned_buffer_is_refused_naming_the_tensor(tiny_models, onnx_folder, tmp_path) -> None:
    cuda = StandInCuda(misalign=True)  # allocations 32 bytes past a 256-byte boundary
    with pytest.raises(EngineError, match=r"activation memory.*256-byte aligned"):
        make(tiny_models, engine_folder(onnx_folder, tmp_path / "e"), cuda)
    cuda = StandInCuda()
    backend, trt = make(tiny_models, engine_folder(onnx_folder, tmp_path / "f"), cuda)
    cuda.misalign = True  # I/O buffers are allocated at the first call
    with pytest.raises(EngineError) as err:
        call_unet(backend, unet_inputs(2))
    assert "buffer of 'sample'" in str(err.value) and "not 256-byte aligned" in str(err.value)
    assert not calls(trt.log, "set_tensor_address")  # nothing misaligned was bound


def test_shapes_are_set_before_addresses(tiny_models, onnx_folder, tmp_path) -> None:
    backend, trt = make(tiny_models, engine_folder(onnx_folder, tmp_path / "e"))
    call_unet(backend, unet_inputs(3))
    call_unet(backend, unet_inputs(2))  # a new batch: bound again
    events = [e for e in trt.log if e[0] in ("set_input_shape", "set_tensor_address", "execute_async_v3")]
    runs, current = [], []
    for e in events:
        current.append(e[0])
        if e[0] == "execute_async_v3":
            runs.append(current)
            current = []
    assert len(runs) == 2
    for run in runs:
        shapes = [i for i, k in enumerate(run) if k == "set_input_shape"]
        addresses = [i for i, k in enumerate(run) if k == "set_tensor_address"]
        assert len(shapes) == 13 and len(addresses) == 23  # 13 inputs; 13 inputs + 10 outputs
        assert max(shapes) < min(addresses)
    batch_shapes = [e[3][0] for e in calls(trt.log, "set_input_shape") if e[2] == "sample"]
    assert batch_shapes == [3, 2]


def test_repeated_shapes_are_not_bound_again(tiny_models, onnx_folder, tmp_path) -> None:
    backend, trt = make(tiny_models, engine_folder(onnx_folder, tmp_path / "e"))
    for seed in range(3):
        x = unet_inputs(2, seed)
        eps, _ = call_unet(backend, x)
        torch.testing.assert_close(eps[:, 0, 0, 0].double(), expected(x), rtol=1e-6, atol=1e-3)
    assert len(calls(trt.log, "set_input_shape")) == 13 and len(calls(trt.log, "execute_async_v3")) == 3


# ------------------------------------------------------------------------------ streams and memory


def test_the_engine_stream_is_ordered_with_torchs(tiny_models, onnx_folder, tmp_path) -> None:
    cuda = StandInCuda()
    backend, _ = make(tiny_models, engine_folder(onnx_folder, tmp_path / "e"), cuda)
    cuda.log.clear()
    x = unet_inputs(2)
    eps, feats = call_unet(backend, x)
    log = cuda.log
    at = {kind: [i for i, e in enumerate(log) if e[:2] == kind] for kind in
          (("wait_stream", "engine"), ("enter", "engine"), ("exit", "engine"), ("wait_stream", "torch"))}
    execute = [i for i, e in enumerate(log) if e[0] == "execute_async_v3"]
    assert len(execute) == 1
    # engine waits for torch's producers -> copies and execute on the engine stream -> torch waits
    assert at[("wait_stream", "engine")][0] < at[("enter", "engine")][0] < execute[0] < at[("exit", "engine")][0]
    assert at[("exit", "engine")][0] < at[("wait_stream", "torch")][0]
    assert log[at[("wait_stream", "engine")][0]] == ("wait_stream", "engine", "torch")
    assert log[at[("wait_stream", "torch")][0]] == ("wait_stream", "torch", "engine")
    _, _, handle, active, _ = log[execute[0]]
    assert handle == 1001 and active == "engine"  # the dedicated stream, not the legacy default one
    recorded = {e[2] for e in log if e[0] == "record_stream" and e[1] == "engine"}
    assert {eps.data_ptr(), *(f.data_ptr() for f in feats)} <= recorded  # outputs written there
    spec = backend.specs["unet"]
    records = [e for e in log if e[0] == "record_stream" and e[1] == "engine"]
    assert len(records) == len(spec.inputs) + len(spec.outputs)  # every input read there, every output written
    copies = [(i, e) for i, e in enumerate(log) if e[0] == "copy"]
    assert all(e[1] == "engine" for _, e in copies)  # in and out, on the engine stream
    assert len([i for i, _ in copies if i < execute[0]]) == len(spec.inputs)
    assert {e[2] for i, e in copies if i > execute[0]} == {eps.data_ptr(), *(f.data_ptr() for f in feats)}


def test_shared_activation_memory_is_the_largest_engines(tiny_models, onnx_folder, tmp_path) -> None:
    backend, trt = make(tiny_models, engine_folder(onnx_folder, tmp_path / "e"))
    sizes = [e.device_memory_size_v2 for e in trt.engines]
    largest = max(sizes)
    assert len(set(sizes)) == len(sizes) == 4  # sized from each build's own profile
    assert backend.activation_memory.numel() == largest
    contexts = [c for e in trt.engines for c in e.contexts]
    assert len(contexts) == len(sizes)
    assert {c.memory for c in contexts} == {(backend.activation_memory.data_ptr(), largest)}
    assert all(c.strategy.name == "USER_MANAGED" for c in contexts)


def test_identity_names_the_engines_not_the_graphs(tiny_models, onnx_folder, tmp_path) -> None:
    """The inversion cache keys on Backend.identity(): a TensorRT backend is identified by its
    engines' keys (another build, another result), not by the ONNX graphs they came from."""
    from p2v_fast.nets.runtime import make_backend

    folder = engine_folder(onnx_folder, tmp_path / "e")
    backend, _ = make(tiny_models, folder)
    ort = make_backend("onnxruntime", tiny_models, folder)
    assert backend.artifact == "engine" and backend.identity()["graphs"] != ort.identity()["graphs"]
    m = read_manifest(folder)
    m.networks["unet"].engine.key = "e" * 16  # type: ignore[union-attr]
    write_manifest(folder, m)
    assert make(tiny_models, folder)[0].identity()["graphs"] != backend.identity()["graphs"]


def test_a_cpu_device_is_refused_before_the_engine_folder_is_read(tiny_models, tmp_path) -> None:
    from p2v_fast.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="runs on a CUDA device, not cpu; pass --device cuda"):
        TensorRTBackend(tiny_models, tmp_path / "missing", machine=H100, trt=StandInTrt(StandInCuda()))


def test_cuda_graph_is_an_option_of_the_tensorrt_backend_only(tiny_models, onnx_folder) -> None:
    from p2v_fast.config import EditConfig
    from p2v_fast.errors import InputError
    from p2v_fast.nets.runtime import make_backend

    with pytest.raises(InputError, match="--cuda-graph is for --backend tensorrt, not torch"):
        EditConfig(cuda_graph=True)
    EditConfig(cuda_graph=True, backend="tensorrt")
    with pytest.raises(InputError, match="--cuda-graph needs the tensorrt backend; onnxruntime runs here"):
        make_backend("onnxruntime", tiny_models, onnx_folder, cuda_graph=True)


# ------------------------------------------------------------------------------ static shapes and CUDA graphs


def test_cuda_graph_is_captured_once_for_static_shapes_and_replayed(tiny_models, onnx_folder, tmp_path) -> None:
    static = ExportProfile(batch=(4, 4, 4), height=(SIZE,) * 3, width=(SIZE,) * 3)
    backend, trt = make(tiny_models, engine_folder(onnx_folder, tmp_path / "e", static), cuda_graph=True)
    results = []
    for seed, batch in ((0, 4), (1, 2), (2, 3)):  # smaller calls are padded to the static batch
        x = unet_inputs(batch, seed)
        eps, _ = call_unet(backend, x)
        results.append((eps, expected(x)))
    for eps, want in results:
        torch.testing.assert_close(eps[:, 0, 0, 0].double(), want, rtol=1e-6, atol=1e-3)
    log = trt.log
    assert [e for e in log if e[0] == "capture"] == [("capture", "engine")]
    assert [e for e in log if e[0] == "replay"] == [("replay", "engine")] * 2
    assert [e[3][0] for e in calls(log, "set_input_shape") if e[2] == "sample"] == [4]  # bound once, batch 4
    executes = calls(log, "execute_async_v3")
    assert [e[4] for e in executes] == [False, True, False, False]  # warm-up, captured, 2 replays


def test_no_cuda_graph_without_the_option_or_for_dynamic_shapes(tiny_models, onnx_folder, tmp_path) -> None:
    static = ExportProfile(batch=(4, 4, 4), height=(SIZE,) * 3, width=(SIZE,) * 3)
    backend, trt = make(tiny_models, engine_folder(onnx_folder, tmp_path / "s", static))
    call_unet(backend, unet_inputs(4))
    call_unet(backend, unet_inputs(4, 1))
    assert not [e for e in trt.log if e[0] in ("capture", "replay")]
    with pytest.raises(EngineError) as err:  # dynamic batch: nothing to replay, refused with the fix
        make(tiny_models, engine_folder(onnx_folder, tmp_path / "d"), cuda_graph=True)
    msg = str(err.value)
    assert "--cuda-graph needs static-shape engines" in msg and "--static-batch" in msg and "\n" not in msg


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(("call", "needle"), [
    ("set_input_shape", "refused shape (2, 5, 8, 8) for input 'sample'"),
    ("set_tensor_address", "refused the address of 'sample'"),
    ("execute_async_v3", "execution failed"),
])
def test_every_refused_call_is_a_clear_error(tiny_models, onnx_folder, tmp_path, call, needle) -> None:
    backend, _ = make(tiny_models, engine_folder(onnx_folder, tmp_path / "e"), refuse=(call,))
    with pytest.raises(EngineError) as err:
        call_unet(backend, unet_inputs(2))
    assert needle in str(err.value) and str(err.value).startswith("unet")


# ------------------------------------------------------------------------------ TensorRT not usable here (CLI)


def test_cli_edit_on_tensorrt_says_first_that_tensorrt_is_not_usable_here(tmp_path) -> None:
    """Before: 'engine folder 'engines' does not exist; create it with `p2v
    export --out engines`', an export that then failed. Now: TensorRT is not usable here, and why."""
    from p2v_fast.media.samples import make_sample_clip
    from p2v_fast.nets.system import tensorrt_status

    ok, status = tensorrt_status()
    if ok:
        pytest.skip("TensorRT is usable here; this is the answer on machines without it")
    clip = make_sample_clip(tmp_path / "c.mp4", n_frames=2, size=(SIZE, SIZE))
    result = p2v("edit", str(clip), "a red car", "--model", "tiny", "--size", str(SIZE),
                 "--backend", "tensorrt", "--engines", str(tmp_path / "none"))
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code != 0 and len(lines) == 1, result.output
    line = lines[0]
    assert line.startswith("error: TensorRT is not usable here: ")
    assert status.removeprefix("not usable: ").split(" (")[0] in line  # the reason p2v info gives
    assert "use --backend onnxruntime or torch" in line
    assert "p2v export" not in line and "does not exist" not in line


# ------------------------------------------------------------------------------ builder logic


class _Builder:
    """Stand-in builder: parser errors, timing cache acceptance, serialization."""

    def __init__(self, parse_errors=(), accepted_cache: bytes = b"") -> None:
        self.parse_errors, self.accepted, self.log = list(parse_errors), accepted_cache, []

    def module(self):
        b = self

        class Cache:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def serialize(self) -> bytes:
                return self.data + b"+tuned"

        class Config:
            def __init__(self) -> None:
                self.cache = None

            def clear_flag(self, flag) -> None:
                b.log.append(("clear_flag", flag))

            def set_memory_pool_limit(self, *a) -> None:
                b.log.append("workspace")

            def add_optimization_profile(self, profile) -> int:
                return 0

            def create_timing_cache(self, data: bytes):
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
                ok = cache.data in (b"", b.accepted)
                b.log.append(("set_timing_cache", cache.data, ok))
                if ok:
                    self.cache = cache
                return ok

            def get_timing_cache(self):
                return self.cache

        class Profile:
            def set_shape(self, *a) -> None:
                pass

        class Builder:
            def __init__(self, logger) -> None:
                pass

            def create_network(self, flags: int):
                b.log.append(("flags", flags))
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config) -> bytes:
                return b"engine"

        class Parser:
            def __init__(self, network, logger) -> None:
                self.num_errors = len(b.parse_errors)

            def parse_from_file(self, path: str) -> bool:
                return not b.parse_errors

            def get_error(self, i: int) -> str:
                return b.parse_errors[i]

        class Trt:
            __version__ = "11.0.0"
            BuilderFlag = type("BuilderFlag", (), {"TF32": "TF32"})
            Logger = type("Logger", (), {"WARNING": 2, "VERBOSE": 4, "__init__": lambda self, level: None})

        Trt.Builder, Trt.OnnxParser = Builder, Parser  # type: ignore[attr-defined]
        return Trt


def test_build_keeps_every_parser_error(tmp_path) -> None:
    from export.tensorrt_build import build_engine

    b = _Builder(parse_errors=["In node 12 (Where): bad\ncondition type", "In node 40 (Concat): axis"])
    with pytest.raises(EngineError) as err:
        build_engine(tmp_path / "unet.onnx", tmp_path / "unet.plan", {}, trt=b.module())
    msg = str(err.value)
    assert "2 error(s)" in msg and "In node 12 (Where): bad condition type" in msg and "node 40 (Concat)" in msg
    assert "\n" not in msg


def test_a_timing_cache_from_another_device_is_replaced_not_fatal(tmp_path) -> None:
    from export.tensorrt_build import build_engine, timing_cache_path

    cache = timing_cache_path(tmp_path, H100)
    assert cache.name == "timing-trt10.8.0-nvidia-h100-80gb-hbm3-sm90.cache"  # TensorRT, GPU name, arch
    cache.write_bytes(b"from an A100")
    b = _Builder(accepted_cache=b"ours")
    notes: list[str] = []
    build_engine(tmp_path / "unet.onnx", tmp_path / "unet.plan", {}, timing_cache=cache, log=notes.append,
                 trt=b.module())
    assert [e for e in b.log if e[0] == "set_timing_cache"] == [("set_timing_cache", b"from an A100", False),
                                                                 ("set_timing_cache", b"", True)]
    assert notes and "another GPU" in notes[0]
    assert cache.read_bytes() == b"+tuned" and (tmp_path / "unet.plan").read_bytes() == b"engine"
    assert ("flags", 0) in b.log  # TensorRT 11: strongly typed by default


def test_tf32_is_cleared_exactly_where_the_spec_forbids_it(tmp_path) -> None:
    """Issue 17 item 2: TensorRT enables TF32 by default; a network whose spec forbids it (every
    fp32 network) is built with BuilderFlag.TF32 cleared."""
    from export.tensorrt_build import build_engine

    for tf32, cleared in ((False, [("clear_flag", "TF32")]), (True, [])):
        b = _Builder()
        build_engine(tmp_path / "depth.onnx", tmp_path / "depth.plan", {}, tf32=tf32, trt=b.module())
        assert [e for e in b.log if e[0] == "clear_flag"] == cleared


# ------------------------------------------------------------------------------ export: engines are validated first


def _export_on_standin(monkeypatch, compute: str = "onnx") -> StandInTrt:
    """``export_engines(format="tensorrt")`` on the CPU: the stand-in TensorRT (version and GPU of
    H100) builds from the real graphs, and ``validate_engine`` runs its engines for real."""
    import p2v_fast.nets.backend_tensorrt as backend_tensorrt
    import p2v_fast.nets.manifest as manifest_mod
    import p2v_fast.nets.system as system
    from export import tensorrt_build

    cuda = StandInCuda()
    trt = StandInTrt(cuda, version=H100.tensorrt, compute=compute)
    monkeypatch.setattr(system, "require_tensorrt", lambda alternative: trt)
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda alternative="": trt)
    monkeypatch.setattr(manifest_mod, "this_machine", lambda device=None: H100)
    monkeypatch.setattr(backend_tensorrt, "TorchCuda", lambda device: cuda)
    return trt


def test_export_records_an_engine_only_after_it_matches_onnxruntime(tiny_models, onnx_folder, tmp_path,
                                                                    monkeypatch) -> None:
    """The export flow with the build and the engine run on the stand-in, validate_engine for
    real: an engine whose outputs differ from ONNX Runtime's by ~1e-3 (TF32 whatever its flag
    says) is deleted and never recorded; one that matches is recorded with its validation."""
    import export as export_pkg
    from export import ExportOptions

    folder = tmp_path / "e"
    shutil.copytree(onnx_folder, folder)
    options = ExportOptions(model="tiny", out=folder, format="tensorrt", precision="fp32", height=SIZE, width=SIZE,
                            max_size=2 * SIZE, max_batch=4, networks=("vae_decoder",))
    _export_on_standin(monkeypatch, compute="onnx-tf32")
    with pytest.raises(ExportValidationError, match=r"vae_decoder: output 'images' differs .*: TensorRT vs ONNX "
                                                    r"Runtime max abs diff .* at the profile's min"):
        export_pkg.export_engines(options, models=tiny_models)
    assert not (folder / "vae_decoder.plan").exists()
    assert read_manifest(folder).networks["vae_decoder"].engine is None
    trt = _export_on_standin(monkeypatch)
    report = export_pkg.export_engines(options, models=tiny_models)
    entry = read_manifest(folder).networks["vae_decoder"]
    assert entry.engine is not None and entry.engine_validation is not None
    assert entry.engine_validation["rel"] < 1e-5
    assert [(r.network, r.stage, r.status) for r in report.rows] == [("vae_decoder", "onnx", "cached"),
                                                                     ("vae_decoder", "tensorrt", "built")]
    assert json.loads((folder / "manifest.json").read_text())["tensorrt"]["gpu"] == H100.gpu
    assert [b["tf32"] for b in trt.builds] == [False]  # an fp32 network: built with TF32 cleared


def test_fp32_engines_validate_only_with_tf32_cleared(tiny_models, onnx_folder, tmp_path, monkeypatch) -> None:
    """Issue 17 item 2, through the stand-in: ``depth`` (fp32 in every precision) built with
    TensorRT's default TF32 differs from ONNX Runtime by ~1e-3 and would be deleted; the export
    clears the flag, and its engine validates. (Before: the flag stayed on and this export failed.)"""
    import export as export_pkg
    from export import ExportOptions, tensorrt_build

    folder = tmp_path / "e"
    shutil.copytree(onnx_folder, folder)
    trt = _export_on_standin(monkeypatch)
    export_pkg.export_engines(ExportOptions(model="tiny", out=folder, format="tensorrt", precision="fp32",
                                            height=SIZE, width=SIZE, max_batch=4, networks=("depth",)),
                              models=tiny_models)
    m = read_manifest(folder)
    assert m.networks["depth"].engine is not None and [b["tf32"] for b in trt.builds] == [False]
    spec = m.networks["depth"].spec
    tensorrt_build.build_engine(folder / "depth.onnx", tmp_path / "tf32.plan",
                                spec.profile_shapes(m.geometry, m.profile), tf32=True, trt=trt)
    cases = tensorrt_build.validation_cases(spec, m.geometry, m.profile)
    with pytest.raises(ExportValidationError, match="depth: output 'predicted_depth' differs"):
        tensorrt_build.validate_engine(tmp_path / "tf32.plan", folder / "depth.onnx", spec, m.geometry, cases,
                                       torch.device("cpu"), trt=trt, ops=trt.cuda)


def test_every_profile_corner_is_validated_before_the_engine_is_recorded(tiny_models, onnx_folder, tmp_path,
                                                                         monkeypatch) -> None:
    """Issue 17 item 6: the unet engine runs (and is compared with ONNX Runtime) at the profile's
    smallest batch and size, its opt shape, and its largest batch and size; before, at opt only."""
    import export as export_pkg
    from export import ExportOptions

    folder = tmp_path / "e"
    shutil.copytree(onnx_folder, folder)
    trt = _export_on_standin(monkeypatch)
    export_pkg.export_engines(ExportOptions(model="tiny", out=folder, format="tensorrt", precision="fp32",
                                            height=SIZE, width=SIZE, max_size=2 * SIZE, max_batch=4,
                                            networks=("unet",)), models=tiny_models)
    shapes = [e[3] for e in calls(trt.log, "set_input_shape") if e[2] == "sample"]
    assert shapes == [(1, 5, 8, 8), (2, 5, 8, 8), (4, 5, 16, 16)]  # min, opt, max
    assert len(calls(trt.log, "execute_async_v3")) == 3
    v = read_manifest(folder).networks["unet"].engine_validation
    assert v is not None and v["rel"] < 1e-5 and v["at"].split(":")[0] in ("min", "opt", "max")


def test_an_engine_from_a_graph_that_drifted_from_the_spec_is_refused(tiny_models, onnx_folder, tmp_path) -> None:
    """Issue 17 item 8: the stand-in's engine is what the graph says, not what the spec says. A
    graph whose ref_0 token axis was fixed to 1 (what item 1's cleaning did) cannot be built with
    the spec's profile (TensorRT fails the build); one whose sample became fp16 builds, and the
    runner refuses its engine naming the tensor."""
    import onnx

    from export.tensorrt_build import build_engine
    from p2v_fast.nets.backend_tensorrt import EngineRunner

    m = read_manifest(onnx_folder)
    spec = m.networks["unet"].spec
    shapes = spec.profile_shapes(m.geometry, m.profile)
    for edit, what in (("fixed", "could not build"), ("fp16", "engine tensor 'sample'")):
        graph = onnx.load(str(onnx_folder / "unet.onnx"))
        if edit == "fixed":
            graph.graph.input[4].type.tensor_type.shape.dim[1].dim_value = 1  # ref_0: ['B', 1, 64]
        else:
            graph.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
        path = tmp_path / f"{edit}.onnx"
        onnx.save(graph, str(path))
        cuda = StandInCuda()
        trt = StandInTrt(cuda, version=H100.tensorrt)
        with pytest.raises(EngineError) as err:
            build_engine(path, tmp_path / f"{edit}.plan", shapes, trt=trt)
            engine = trt.Runtime(None).deserialize_cuda_engine((tmp_path / f"{edit}.plan").read_bytes())
            EngineRunner(trt, engine, spec, m.geometry, ops=cuda, stream=cuda.new_stream(), hint="")
        assert what in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("version", ["10.8.0", "11.0.0"])
def test_the_build_takes_each_tensorrt_versions_own_path(onnx_folder, tmp_path, version) -> None:
    """TensorRT 10.x: a strongly typed network through NetworkDefinitionCreationFlag; 11.x: the
    default (no flag). The workspace limit goes through MemoryPoolType.WORKSPACE (a plain int is
    refused, as pybind11 refuses it); 11.x has no device_memory_size (device_memory_size_v2 is read)."""
    from export.tensorrt_build import build_engine
    from p2v_fast.nets.backend_tensorrt import device_memory_size

    m = read_manifest(onnx_folder)
    spec = m.networks["vae_decoder"].spec
    trt = StandInTrt(StandInCuda(), version=version)
    build_engine(onnx_folder / "vae_decoder.onnx", tmp_path / "v.plan", spec.profile_shapes(m.geometry, m.profile),
                 workspace_gb=1.5, trt=trt)
    (plan,) = trt.builds
    assert plan["strongly_typed"] and plan["workspace"] == int(1.5 * 2**30)
    engine = trt.Runtime(None).deserialize_cuda_engine((tmp_path / "v.plan").read_bytes())
    assert device_memory_size(engine) == plan["device_memory"]


def test_a_profile_tensorrt_refuses_is_one_line_naming_the_input(onnx_folder, tmp_path) -> None:
    """Issue 17 item 5: IOptimizationProfile.set_shape raises (it never returns False)."""
    from export.tensorrt_build import build_engine

    m = read_manifest(onnx_folder)
    spec = m.networks["vae_decoder"].spec
    lo, opt, hi = spec.profile_shapes(m.geometry, m.profile)["latent"]
    with pytest.raises(EngineError) as err:
        build_engine(onnx_folder / "vae_decoder.onnx", tmp_path / "v.plan", {"latent": (hi, opt, lo)},
                     trt=StandInTrt(StandInCuda(), version=H100.tensorrt))
    msg = str(err.value)
    assert msg.startswith("TensorRT refused the profile of input 'latent'") and "min <= opt <= max" in msg
    assert "\n" not in msg and not (tmp_path / "v.plan").exists()


def test_a_refused_optimisation_profile_switch_is_one_line(tiny_models, onnx_folder, tmp_path) -> None:
    """Issue 17 item 5: set_optimization_profile_async raises when TensorRT refuses the switch.
    An engine with two profiles (64x64 and 128x128), stand-in-built; a call at 128x128 switches."""
    from export.tensorrt_build import build_engine
    from p2v_fast.nets.backend_tensorrt import EngineRunner

    m = read_manifest(onnx_folder)
    spec = m.networks["vae_decoder"].spec
    cuda = StandInCuda()
    trt = StandInTrt(cuda, version=H100.tensorrt, refuse=("set_optimization_profile_async",))
    small = spec.profile_shapes(m.geometry, ExportProfile((1, 2, 4), (SIZE,) * 3, (SIZE,) * 3))
    large = spec.profile_shapes(m.geometry, ExportProfile((1, 2, 4), (2 * SIZE,) * 3, (2 * SIZE,) * 3))
    build_engine(onnx_folder / "vae_decoder.onnx", tmp_path / "v.plan", small, trt=trt)
    plan = json.loads((tmp_path / "v.plan").read_text())
    plan["profiles"].append({k: [list(s) for s in v] for k, v in large.items()})  # as a second add_optimization_profile
    engine = trt.Runtime(None).deserialize_cuda_engine(json.dumps(plan).encode())
    runner = EngineRunner(trt, engine, spec, m.geometry, ops=cuda, stream=cuda.new_stream(), hint="")
    runner.activate(cuda.zeros((engine.device_memory_size_v2,), torch.uint8))
    runner.run({"latent": torch.randn(2, 4, SIZE // 8, SIZE // 8)})  # profile 0: no switch
    with pytest.raises(EngineError) as err:
        runner.run({"latent": torch.randn(2, 4, SIZE // 4, SIZE // 4)})
    msg = str(err.value)
    assert msg.startswith("vae_decoder: TensorRT refused optimisation profile 1 for input 'latent' (2, 4, 16, 16)")
    assert "\n" not in msg


def test_a_failed_cuda_graph_capture_falls_back_to_plain_launches(tiny_models, onnx_folder, tmp_path,
                                                                  capsys) -> None:
    """Issue 17 item 4: an enqueue that returns False during the capture (the capture is then
    invalidated, and torch.cuda.graph's exit raises its own error): one warning line, the results
    are right, and later calls run plain launches (no second capture, no replay). Before, the
    error raised inside the capture was masked by the exit's."""
    static = ExportProfile(batch=(4, 4, 4), height=(SIZE,) * 3, width=(SIZE,) * 3)
    backend, trt = make(tiny_models, engine_folder(onnx_folder, tmp_path / "e", static), cuda_graph=True,
                        refuse_in_capture=("execute_async_v3",))
    for seed in (0, 1, 2):
        x = unet_inputs(3, seed)
        eps, _ = call_unet(backend, x)
        torch.testing.assert_close(eps[:, 0, 0, 0].double(), expected(x), rtol=1e-6, atol=1e-3)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: unet: CUDA graph capture failed"), lines
    assert CAPTURE_INVALIDATED in lines[0] or "returned False" in lines[0]
    assert [e[0] for e in trt.log if e[0] in ("capture", "replay")] == ["capture"]
    assert [e[4] for e in calls(trt.log, "execute_async_v3")] == [False, True, False, False]


# ------------------------------------------------------------------------------ issue 26 item 7: engines that fit


def _reference_batches(monkeypatch) -> list[int]:
    """The batch of every run of a graph in ONNX Runtime (the engine check's reference runs)."""
    from p2v_fast.nets import backend_onnx

    batches: list[int] = []
    run = backend_onnx.OnnxSession.run

    def counted(self, feeds):
        batches.append(int(next(iter(feeds.values())).shape[0]))
        return run(self, feeds)

    monkeypatch.setattr(backend_onnx.OnnxSession, "run", counted)
    return batches


def test_the_engine_check_runs_onnx_runtime_in_slices_that_fit_its_budget(onnx_folder, tmp_path,
                                                                          monkeypatch) -> None:
    """ONNX Runtime holds a UNet's attention scores in full (~50 GB at batch 8 and 896x896 in fp16):
    with a budget below one sample's scores the reference runs one sample at a time while the
    engine runs the whole batch, and the result equals the unsliced check's. (The engine keeps
    TF32 on, so it differs from ONNX Runtime by ~1e-3: a tolerance of 1e-2 lets it pass.)"""
    import dataclasses

    from export import tensorrt_build

    m = read_manifest(onnx_folder)
    spec = dataclasses.replace(m.networks["unet"].spec, tolerance=1e-2)
    profile = ExportProfile((1, 2, 4), (SIZE, SIZE, 2 * SIZE), (SIZE, SIZE, 2 * SIZE))
    trt = StandInTrt(StandInCuda(), version=H100.tensorrt, compute="onnx")
    tensorrt_build.build_engine(onnx_folder / "unet.onnx", tmp_path / "u.plan",
                                spec.profile_shapes(m.geometry, profile), tf32=True, trt=trt)
    cases = tensorrt_build.validation_cases(spec, m.geometry, profile)
    batches = _reference_batches(monkeypatch)

    def check(budget: int | None) -> dict:
        batches.clear()
        return tensorrt_build.validate_engine(tmp_path / "u.plan", onnx_folder / "unet.onnx", spec, m.geometry, cases,
                                              torch.device("cpu"), trt=trt, ops=trt.cuda, budget=budget)

    whole = check(None)
    assert batches == [1, 2, 4]  # min, opt, max: the tiny UNet's scores fit the default budget
    assert 1e-4 < whole["rel"] < 1e-2 and whole["max_abs"] > 0
    numbers = {k: whole[k] for k in ("max_abs", "rel")}
    per_sample = tensorrt_build.score_bytes_per_sample(spec, spec.dims(m.geometry, 4, 2 * SIZE, 2 * SIZE))
    sliced = check(per_sample * 2)
    assert batches == [1, 2, 2, 2]  # the max corner in two runs of two
    assert {k: sliced[k] for k in numbers} == pytest.approx(numbers, rel=1e-6)
    assert (sliced["output"], sliced["at"]) == (whole["output"], whole["at"])
    single = check(1)
    assert batches == [1, 1, 1, 1, 1, 1, 1]
    assert {k: single[k] for k in numbers} == pytest.approx(numbers, rel=1e-6)


def _folder_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith("timing-")}


def _listed(folder: Path) -> set[str]:
    m = read_manifest(folder)
    return {"manifest.json"} | {f for e in m.networks.values() for a in (e.onnx, e.engine) if a for f, _ in a.files()}


@pytest.mark.parametrize("failure", ["onnxruntime", "build", "interrupt"])
def test_a_failed_engine_build_or_check_leaves_no_unlisted_file(tiny_models, onnx_folder, tmp_path, monkeypatch,
                                                                failure) -> None:
    """An engine rebuilt for another profile whose check fails in ONNX Runtime (its error in one
    line), whose build fails after writing part of the engine, or that is interrupted leaves neither
    the new engine nor the earlier one (which the manifest no longer lists): the folder holds
    exactly what its manifest lists."""
    import export as export_pkg
    from export import ExportOptions, tensorrt_build

    folder = tmp_path / "e"
    shutil.copytree(onnx_folder, folder)
    options = ExportOptions(model="tiny", out=folder, format="tensorrt", precision="fp32", height=SIZE, width=SIZE,
                            max_batch=4, networks=("vae_decoder",))
    _export_on_standin(monkeypatch)
    export_pkg.export_engines(options, models=tiny_models)
    assert "vae_decoder.plan" in _listed(folder) and _folder_files(folder) == _listed(folder)

    if failure == "onnxruntime":  # ONNX Runtime's own exception type, its text over lines
        import onnxruntime
        from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

        def broken(self, binding):
            raise RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned\n"
                                   "while running Conv node")

        monkeypatch.setattr(onnxruntime.InferenceSession, "run_with_iobinding", broken)
        expected_error: type[BaseException] = EngineError
    elif failure == "build":
        def broken_build(onnx_path, engine_path, *a, **kw):
            Path(engine_path).write_bytes(b"half an engine")
            raise EngineError("TensorRT could not build an engine")
        monkeypatch.setattr(tensorrt_build, "build_engine", broken_build)
        expected_error = EngineError
    else:
        def interrupted(*a, **kw):
            raise KeyboardInterrupt
        monkeypatch.setattr(tensorrt_build, "validate_engine", interrupted)
        expected_error = KeyboardInterrupt
    with pytest.raises(expected_error) as err:
        export_pkg.export_engines(ExportOptions(**{**options.__dict__, "max_batch": 2}), models=tiny_models)
    if failure == "onnxruntime":
        msg = str(err.value)
        assert msg.startswith("ONNX Runtime failed to run vae_decoder on batch 1 at 64x64") and "\n" not in msg
        assert "RUNTIME_EXCEPTION" in msg and "profile's min" in msg
    assert read_manifest(folder).networks["vae_decoder"].engine is None
    assert "vae_decoder.plan" not in _folder_files(folder) and _folder_files(folder) == _listed(folder)
