"""``manifest.json`` beside the engines, cache keys, and the checks that refuse a mismatch.

An engine folder holds one model's networks at one precision: ``<network>.onnx`` (plus
``<network>.onnx.data`` when the weights pass protobuf's 2 GB limit), ``<network>.plan`` for
TensorRT, ``manifest.json`` and a TensorRT timing cache. The manifest records what every
artifact was made from; each artifact carries a key hashed from everything that invalidates it:

- ONNX: network, model (identity + component configs), precision, opset, the spec's IO
  signature and :data:`EXPORT_VERSION` (bumped when a wrapper module changes).
- TensorRT engine: the ONNX key, the optimisation profile, TensorRT version and GPU compute
  capability (an engine runs only on the architecture and TensorRT version that built it).

Loading checks the model, the files' sizes (a truncated copy is caught before a parser sees
it) and, for engines, this machine; every refusal is one line with the exact ``p2v export``
command that rebuilds the folder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from p2v_fast.errors import EngineError, one_line
from p2v_fast.files import write_bytes_atomic
from p2v_fast.nets.export_options import DEFAULT_ENGINES as DEFAULT_ENGINES  # the engine folder's default
from p2v_fast.nets.specs import NETWORKS, ExportProfile, Geometry, NetworkSpec
from p2v_fast.weights.models import ModelId

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: one `unet` network (was unet_anchor + unet_xframe)
#: Bump when a wrapper module or the export recipe changes the graphs.
EXPORT_VERSION = 2  # 2: one unet graph with self_ref


#: The largest manifest read (a real one is ~30 KB; a bigger file is not p2v's and is never parsed).
MAX_MANIFEST_BYTES = 1 << 20


def artifact_names(network: str) -> dict[str, str]:
    """The only file names an engine folder's manifest may give ``network``'s artifacts (what
    ``p2v export`` writes): the graph, its external weights and the TensorRT engine."""
    return {"file": f"{network}.onnx", "data_file": f"{network}.onnx.data", "engine": f"{network}.plan"}


def outside(folder: Path, name: str) -> str | None:
    """Why ``folder/name`` is not a file of ``folder`` itself (None: it is): ``name`` must be a plain
    file name (no separator, no ``..``, not absolute) and the path, links followed, must stay in
    ``folder``. Nothing is read or stat'ed outside it."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        return f"{name!r} is not a plain file name"
    root = Path(folder).resolve()
    target = (root / name).resolve()
    if target.parent != root:
        return f"'{Path(folder) / name}' is a link that leads outside the folder (to '{target}')"
    return None


def _digest(fields: Mapping, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:n]


# ----------------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class Machine:
    """What an engine must match: TensorRT version and GPU (None where absent)."""

    tensorrt: str | None
    compute_capability: str | None  # "9.0"
    gpu: str | None = None

    def describe(self) -> str:
        trt = f"TensorRT {self.tensorrt}" if self.tensorrt else "no TensorRT"
        gpu = f"{self.gpu} (compute capability {self.compute_capability})" if self.compute_capability else "no CUDA GPU"
        return f"{trt}, {gpu}"


def this_machine(device=None) -> Machine:
    """TensorRT version (if usable) and the GPU ``device`` (a CUDA torch.device or index;
    default: the current CUDA device) with its compute capability, where there is one."""
    import torch

    try:
        import tensorrt as trt

        version: str | None = str(trt.__version__)
    except Exception:  # PyPI's placeholder package raises on import
        version = None
    cc = gpu = None
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        index = torch.cuda.current_device() if device is None else torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        major, minor = torch.cuda.get_device_capability(index)
        cc, gpu = f"{major}.{minor}", torch.cuda.get_device_name(index)
    return Machine(version, cc, gpu)


# ----------------------------------------------------------------------------------- keys


def onnx_key(spec: NetworkSpec, model: ModelId, opset: int, exporter: str = "torchscript") -> str:
    """Cache key of an exported ONNX graph."""
    fields = {
        "network": spec.name,
        "model": model.digest,
        "precision": spec.precision,
        "opset": opset,
        "io": spec.to_dict(),
        "export_version": EXPORT_VERSION,
    }
    if exporter != "torchscript":  # the default leaves keys as they were
        fields["exporter"] = exporter
    return _digest(fields)


def engine_key(onnx: str, profile: Mapping[str, object], machine: Machine) -> str:
    """Cache key of a TensorRT engine built from the ONNX graph with key ``onnx``."""
    return _digest({
        "onnx": onnx,
        "profile": {k: [list(s) for s in v] for k, v in profile.items()},  # type: ignore[attr-defined]
        "tensorrt": machine.tensorrt,
        "compute_capability": machine.compute_capability,
        "gpu": machine.gpu,  # two GPUs of one architecture can still differ (e.g. A100 and A30)
    })


# ----------------------------------------------------------------------------------- manifest


@dataclass
class Artifact:
    """One file of the folder and the key it was made for."""

    file: str
    key: str
    bytes: int
    seconds: float = 0.0
    data_file: str | None = None  # external weights of a large ONNX graph
    data_bytes: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Mapping) -> Artifact:
        art = cls(**d)
        if not (isinstance(art.key, str) and type(art.bytes) is int and type(art.data_bytes) is int
                and isinstance(art.seconds, int | float) and art.bytes >= 0 and art.data_bytes >= 0):
            raise TypeError("an artifact's key, sizes or seconds")
        return art

    def files(self) -> list[tuple[str, int]]:
        """(file name, recorded bytes) of the artifact and of its external weights."""
        return [(self.file, self.bytes)] + ([(self.data_file, self.data_bytes)] if self.data_file else [])

    def problem(self, folder: Path) -> str | None:
        """Why the artifact's files in ``folder`` are not whole (None: each has its recorded size)."""
        for file, size in self.files():
            path = folder / file
            away = outside(folder, file)
            if away is not None:
                return f"{away}; an engine folder's files stay in it"
            if not path.is_file():
                return f"'{path}' is missing"
            actual = path.stat().st_size
            if actual != size:
                return f"'{path}' is truncated or altered ({actual} bytes, manifest says {size})"
        return None


@dataclass
class NetworkEntry:
    spec: NetworkSpec
    onnx: Artifact | None = None
    engine: Artifact | None = None
    profile: dict[str, list[list[int]]] | None = None  # TensorRT: input -> [min, opt, max]
    validation: dict | None = None  # ONNX vs PyTorch, worst output: {"output", "max_abs", "rel", "tolerance"}
    engine_validation: dict | None = None  # TensorRT engine vs ONNX Runtime, the same fields

    def to_dict(self) -> dict:
        return {
            "spec": self.spec.to_dict(),
            "onnx": self.onnx.to_dict() if self.onnx else None,
            "engine": self.engine.to_dict() if self.engine else None,
            "profile": self.profile,
            "validation": self.validation,
            "engine_validation": self.engine_validation,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> NetworkEntry:
        return cls(
            spec=NetworkSpec.from_dict(d["spec"]),
            onnx=Artifact.from_dict(d["onnx"]) if d.get("onnx") else None,
            engine=Artifact.from_dict(d["engine"]) if d.get("engine") else None,
            profile=d.get("profile"),
            validation=d.get("validation"),
            engine_validation=d.get("engine_validation"),
        )


@dataclass
class Manifest:
    """Contents of ``manifest.json``."""

    model: ModelId
    precision: str
    opset: int
    geometry: Geometry
    profile: ExportProfile
    options: dict  # the export options, to rebuild the folder (see rebuild_command)
    machine: Machine | None = None  # TensorRT version and GPU that built the engines
    networks: dict[str, NetworkEntry] = field(default_factory=dict)
    versions: dict = field(default_factory=dict)  # torch, onnx, p2v-fast

    @property
    def has_engines(self) -> bool:
        return any(e.engine is not None for e in self.networks.values())

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.to_dict(),
            "precision": self.precision,
            "opset": self.opset,
            "geometry": self.geometry.to_dict(),
            "profile": self.profile.to_dict(),
            "options": self.options,
            "tensorrt": None if self.machine is None else {
                "version": self.machine.tensorrt,
                "compute_capability": self.machine.compute_capability,
                "gpu": self.machine.gpu,
            },
            "versions": self.versions,
            "networks": {k: v.to_dict() for k, v in self.networks.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Manifest:
        trt = d.get("tensorrt")
        return cls(
            model=ModelId(**d["model"]),
            precision=d["precision"],
            opset=int(d["opset"]),
            geometry=Geometry.from_dict(d["geometry"]),
            profile=ExportProfile.from_dict(d["profile"]),
            options=dict(d.get("options", {})),
            machine=None if not trt else Machine(trt.get("version"), trt.get("compute_capability"), trt.get("gpu")),
            networks={k: NetworkEntry.from_dict(v) for k, v in d.get("networks", {}).items()},
            versions=dict(d.get("versions", {})),
        )


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write ``folder/manifest.json`` atomically."""
    return write_bytes_atomic(Path(folder) / MANIFEST, (json.dumps(manifest.to_dict(), indent=2) + "\n").encode(),
                              "the engine manifest")


def _export_hint(folder: Path) -> str:
    """What to do about a folder that is not an engine folder: export into it only where that
    writes nothing among someone else's files (it is missing or empty)."""
    try:
        empty = not folder.exists() or (folder.is_dir() and next(folder.iterdir(), None) is None)
    except OSError:
        empty = False
    if empty:
        return f"create it with `p2v export --engines {folder}`"
    return "pass --engines a folder that `p2v export --engines DIR` made (a new or empty DIR)"


def read_manifest(folder: str | Path) -> Manifest:
    """Read ``folder/manifest.json``; one-line :class:`EngineError` if it is missing, unreadable,
    larger than :data:`MAX_MANIFEST_BYTES`, a link out of the folder, lists a network p2v does not
    know or names any file but the network's own (:func:`artifact_names`): an engine folder is
    confined to itself."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise EngineError(f"engine folder '{folder}' is a file, not a folder; {_export_hint(folder)}")
    if not folder.is_dir():
        raise EngineError(f"engine folder '{folder}' does not exist; {_export_hint(folder)} or pass --engines")
    path = folder / MANIFEST
    if not path.is_file():
        raise EngineError(f"'{folder}' has no {MANIFEST}; it is not an engine folder ({_export_hint(folder)})")
    redo = f"re-export with `p2v export --engines {folder} --overwrite`"
    away = outside(folder, MANIFEST)
    if away is not None:
        raise EngineError(f"{away}; an engine folder's files stay in it; {redo}")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise EngineError(f"cannot read '{path}': {one_line(e)}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise EngineError(f"'{path}' is larger than any manifest p2v writes ({MAX_MANIFEST_BYTES // 1024} KB at "
                          f"most), so it was not read; {redo}")
    try:
        data = json.loads(raw.decode("utf-8"))
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise EngineError(f"'{path}' has format version {version!r}, this p2v-fast reads {FORMAT_VERSION}; {redo}")
        manifest = Manifest.from_dict(data)
    except EngineError:
        raise
    except Exception as exc:  # any parse failure is a corrupt manifest
        raise EngineError(f"'{path}' is corrupt ({type(exc).__name__}); {redo}") from None
    _check_confined(manifest, path, redo)
    return manifest


def _check_confined(manifest: Manifest, path: Path, redo: str) -> None:
    """Only the networks p2v knows, each naming only its own files (nothing outside the folder,
    nothing of another network's: cleaning a stale engine must never delete a graph)."""
    unknown = [name for name in manifest.networks if name not in NETWORKS]
    if unknown:
        shown = ", ".join(repr(n[:40]) for n in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3
                                                                else "")
        raise EngineError(f"'{path}' lists networks p2v does not know ({shown}; it knows {', '.join(NETWORKS)}); "
                          f"{redo}")
    for name, entry in manifest.networks.items():
        own = artifact_names(name)
        named: list[tuple[object, str | None, str]] = []  # (file named, the only name allowed, what it is)
        if entry.onnx is not None:
            named.append((entry.onnx.file, own["file"], "graph"))
            if entry.onnx.data_file is not None:
                named.append((entry.onnx.data_file, own["data_file"], "graph's weights"))
        if entry.engine is not None:
            named.append((entry.engine.file, own["engine"], "engine"))
            if entry.engine.data_file is not None:
                named.append((entry.engine.data_file, None, "engine's weights"))
        for file, expected, what in named:
            if file != expected:
                where = f"'{expected}'" if expected else "no other file"
                raise EngineError(f"'{path}' names {str(file)[:80]!r} as the {name} {what}, but an engine folder "
                                  f"keeps it in {where} (p2v writes no other name); {redo}")


# ----------------------------------------------------------------------------------- checks


def rebuild_command(manifest: Manifest, folder: Path, **changes: object) -> str:
    """The ``p2v export`` command that rebuilds ``folder`` from its recorded options (with changes).

    ``changes`` override options: ``model``, ``format``, ``static_batch`` (one shape: the opt
    size and the max batch, for ``--cuda-graph``), and ``height``/``width``: a fixed-size folder
    is rebuilt at the new size; a dynamic one has its range widened to include it.
    """
    o = {**manifest.options, **{k: v for k, v in changes.items() if v is not None}}
    p = manifest.profile
    hr, wr = list(p.height), list(p.width)
    for rng, key in ((hr, "height"), (wr, "width")):
        if changes.get(key) is not None:
            v = int(changes[key])  # type: ignore[call-overload]
            rng[:] = [v, v, v] if p.fixed_size else [min(rng[0], v), v, max(rng[2], v)]
    parts = ["p2v export", f"--model {o.get('model', manifest.model.source)}", f"--height {hr[1]} --width {wr[1]}"]
    static = bool(o.get("static_batch"))
    if not static and (hr[0] != hr[2] or wr[0] != wr[2]):
        parts.append(f"--min-size {min(hr[0], wr[0])} --max-size {max(hr[2], wr[2])}")
    elif not static:  # one size: said, since the default range is wider (16:9 either way round)
        parts.append(f"--max-size {max(hr[2], wr[2])}")
    parts.append(f"--max-batch {p.batch[2]}")
    if static:
        parts.append("--static-batch")
    elif p.batch[1] != p.batch[2]:
        parts.append(f"--opt-batch {p.batch[1]}")
    parts.append(f"--dtype {manifest.precision} --format {o.get('format', 'onnx')}")
    if o.get("exporter", "torchscript") != "torchscript":
        parts.append(f"--exporter {o['exporter']}")
    parts.append(f"--engines {folder} --overwrite")
    return " ".join(parts)


def check_model(manifest: Manifest, model: ModelId, folder: Path) -> None:
    if manifest.model.digest != model.digest:
        raise EngineError(
            f"engines in '{folder}' were exported from model '{manifest.model.source}', not '{model.source}'; "
            f"rebuild: {rebuild_command(manifest, folder, model=model.source)}"
        )


def check_machine(manifest: Manifest, machine: Machine, folder: Path) -> None:
    """Refuse TensorRT engines built with another TensorRT version or on another GPU (its name and
    compute capability are recorded: TensorRT tunes kernels for the exact GPU that built them)."""
    built = manifest.machine
    if built is None or not manifest.has_engines:
        raise EngineError(f"'{folder}' holds ONNX graphs only, no TensorRT engines; build them: "
                          f"{rebuild_command(manifest, folder, format='tensorrt')}")
    if (built.tensorrt, built.compute_capability, built.gpu) != (machine.tensorrt, machine.compute_capability,
                                                                 machine.gpu):
        raise EngineError(
            f"engines in '{folder}' were built with {built.describe()}; this machine has {machine.describe()}; "
            f"rebuild here: {rebuild_command(manifest, folder, format='tensorrt')}"
        )


def check_files(manifest: Manifest, folder: Path, kind: str) -> None:
    """Every ``kind`` ("onnx" or "engine") artifact exists with its recorded size (catches truncation)."""
    fix = rebuild_command(manifest, folder, **({"format": "tensorrt"} if kind == "engine" else {}))
    for name, entry in manifest.networks.items():
        art = entry.onnx if kind == "onnx" else entry.engine
        if art is None:
            raise EngineError(f"'{folder}' has no {kind} for {name}; rebuild: {fix}")
        problem = art.problem(folder)
        if problem is not None:
            raise EngineError(f"{problem}; rebuild: {fix}")


def check_size(manifest: Manifest, folder: Path, batch: int | None, height: int | None, width: int | None) -> None:
    """Refuse a call outside the engines' optimisation profile, naming the command that widens it.
    ``batch`` None: any batch (callers that split batches). Static-batch engines take any batch
    up to theirs (the runner pads it)."""
    p = manifest.profile
    if batch is None:
        batch = p.batch[0]
    elif p.batch[0] == p.batch[2]:
        batch = min(max(batch, p.batch[0]), p.batch[2]) if batch <= p.batch[2] else batch
    if p.contains(batch, height, width):
        return
    if height is not None and width is not None and not p.contains(p.batch[0], height, width):
        raise EngineError(
            f"engines in '{folder}' accept {p.describe()}, not {height}x{width}; rebuild: "
            f"{rebuild_command(manifest, folder, height=height, width=width)}"
        )
    raise EngineError(f"engines in '{folder}' accept {p.describe()}, not batch {batch}")


def describe_folder(folder: Path, machine: Machine | None = None, model: str | None = None) -> list[tuple[str, str]]:
    """Rows for ``p2v info --engines``: the folder's precision and profile; whether the model it was
    exported from matches ``model`` as it is here (default: the model it names; read from its
    config files, no weights loaded); whether its TensorRT engines were built on this machine;
    and per network, for its ONNX graph and its engine, "usable here" or why not."""
    from p2v_fast.errors import ModelLoadError
    from p2v_fast.weights.models import model_id_at

    label = "engine folder"
    try:
        manifest = read_manifest(folder)
    except EngineError as exc:
        return [(label, f"none: {exc}")]
    machine = machine or this_machine()
    rows = [(label, f"{folder}: {manifest.precision}, opset {manifest.opset}, {manifest.profile.describe()}")]

    target = model or manifest.model.source
    model_ok: bool | None = None  # None: could not be checked here
    try:
        here = model_id_at(target)
    except ModelLoadError as exc:
        rows.append(("  model", f"exported from {manifest.model.source}; not checked: {exc}"))
    else:
        model_ok = here.digest == manifest.model.digest
        if model_ok:
            what = "" if target == manifest.model.source else f"exported from {manifest.model.source}; "
            rows.append(("  model", f"{what}{target}: matches the model here"))
        else:
            rows.append(("  model", f"exported from {manifest.model.source}, but {target} here is another model "
                                    f"(its identity or configs differ); re-export: "
                                    f"{rebuild_command(manifest, folder, model=target)}"))

    if manifest.machine is not None and manifest.has_engines:
        same = (manifest.machine.tensorrt, manifest.machine.compute_capability, manifest.machine.gpu) == (
            machine.tensorrt, machine.compute_capability, machine.gpu)
        rows.append(("  TensorRT", f"engines built with {manifest.machine.describe()}; this machine: "
                                   f"{'the same' if same else machine.describe()}"))

    def state(problem: str | None, extra: str | None) -> str:
        if problem is not None:
            return "NOT USABLE: leads outside the folder" if "outside" in problem else "MISSING OR TRUNCATED"
        if model_ok is False:
            return "not usable here: another model"
        if extra:
            return f"not usable here: {extra}"
        return "usable here" if model_ok else "files whole (model not checked)"

    for name, entry in manifest.networks.items():
        parts = []
        if entry.onnx is not None:
            size = (entry.onnx.bytes + entry.onnx.data_bytes) / 2**20
            parts.append(f"{entry.onnx.file} {size:.1f} MB {state(entry.onnx.problem(folder), None)}")
        if entry.engine is not None:
            why = None
            built = manifest.machine
            if built is None or (built.tensorrt, built.compute_capability, built.gpu) != (
                    machine.tensorrt, machine.compute_capability, machine.gpu):
                why = "built on another machine" if machine.tensorrt else "no TensorRT on this machine"
            elif entry.onnx is None or entry.engine.key != engine_key(
                    entry.onnx.key, entry.spec.profile_shapes(manifest.geometry, manifest.profile), machine):
                why = "stale (built from another graph or profile)"
            size = entry.engine.bytes / 2**20
            parts.append(f"{entry.engine.file} {size:.1f} MB {state(entry.engine.problem(folder), why)}")
        rows.append((f"  {name}", "; ".join(parts) or "no artifacts"))
    return rows
