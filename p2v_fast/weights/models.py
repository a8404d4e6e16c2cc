"""Loading the SD2-depth model set (and the BLIP captioner) from the hub, a folder or "tiny".

Every source goes through one code path: the source is resolved to a local diffusers folder
(the tiny set's cache folder, the user's folder, or the hub cache snapshot, downloaded first if
needed) and loaded with ``StableDiffusionDepth2ImgPipeline.from_pretrained``; the pipeline's
components are then pulled out into a :class:`Models`. The pipeline object itself is dropped.

Precision: VAE, UNet and text encoder in the requested ``dtype``; the DPT-Hybrid depth
estimator always in fp32 (its batch norms are not fp16-safe). Every module is in eval mode
with gradients off (the autograd latent update takes gradients w.r.t. the latent, not the
weights).

Every failure is raised as :class:`p2v_fast.errors.ModelLoadError` (or
:class:`~p2v_fast.errors.BackendUnavailableError` for a device this machine lacks) with a
one-line message; nothing here prints a traceback, and nothing waits long on a network that
is not there. A malformed folder is refused at load where the configs tell (:func:`_check_fit`,
a scheduler that is not epsilon-predicting), and otherwise at the first call of the network that
fails (:func:`first_call`, which the backends and the text and depth conditioning run through).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from p2v_fast.config import DEFAULT_CAPTIONER, DEFAULT_MODEL, resolve_device
from p2v_fast.errors import ModelLoadError, P2VError, is_out_of_memory, one_line
from p2v_fast.weights.downloads import CAPTIONER_INSTEAD, check_predicts_noise, own_captioner
from p2v_fast.weights.hub import (
    MINI_FOLDER,
    check_model_source,
    from_hub,
    image_processor_class,
    looks_like_path,
    looks_like_repo_id,
    quiet_loading,
)

TINY = "tiny"
MINI = "mini"


def random_weights(source: str) -> bool:
    """Whether the model ``source`` names (--model, or :attr:`Models.source`) has random weights:
    the tiny test set, or a benchmark's full-size architecture (``arch:...``). Its numbers (the
    inversion's reconstruction error, the guided update's size) say nothing of a trained model's."""
    return source == TINY or source.startswith("arch:")


def mini_model_dir() -> Path:
    """The trained small pipeline shipped in the package (``p2v_fast/weights/mini``; issue 25):
    SD2-depth architectures, narrow, trained on rendered scenes (p2v_fast.media.scenes), not on
    real footage. Raises :class:`ModelLoadError` where this install lacks it."""
    folder = MINI_FOLDER
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"the 'mini' weights are not in this install (no {folder / 'model_index.json'})")
    return folder

#: Components a depth pipeline folder must have (model_index.json entry + subfolder).
PIPELINE_COMPONENTS = (
    "vae",
    "text_encoder",
    "tokenizer",
    "unet",
    "scheduler",
    "depth_estimator",
    "feature_extractor",
)
PIPELINE_CLASS = "StableDiffusionDepth2ImgPipeline"


@dataclass
class Models:
    """The SD2-depth components, ready for inference.

    ``vae``, ``unet``, ``text_encoder`` are in ``dtype`` on ``device``; ``depth_estimator`` is
    fp32 on ``device``. ``scheduler`` is a fresh ``DDIMScheduler`` built from the model's
    scheduler config. ``source`` is what the user asked for (hub id, folder path or
    ``"tiny"``); ``local_dir`` the folder the weights were read from when that is a folder
    the user (or the tiny builder) owns, else ``None`` (hub models).
    """

    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    depth_estimator: Any
    feature_extractor: Any
    source: str
    local_dir: Path | None
    device: torch.device
    dtype: torch.dtype
    label: str = ""  # the model in messages: "model folder './x'", "model 'owner/name' (cached at ...)"
    _captioners: dict[str | None, tuple[Any, Any]] = field(default_factory=dict, init=False, repr=False)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each axis (8 for SD2 and the tiny set)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def load_captioner(self, captioner: str | None = None) -> tuple[Any, Any]:
        """The BLIP captioner ``(model, processor)`` (``--captioner``), loaded on first use and then kept.

        ``captioner``: a hub id or a local folder; None: the model folder's ``captioner/``
        subfolder (tiny, mini) if it has one, else ``Salesforce/blip-image-captioning-base``
        from the hub cache (downloaded if the hub is reachable). fp32 on the CPU, ``dtype`` on CUDA.
        """
        if captioner not in self._captioners:
            self._captioners[captioner] = _load_captioner(self.local_dir, self.device, self.dtype, captioner)
        return self._captioners[captioner]


#: The networks as messages name them.
NETWORK_NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder", "depth_estimator": "depth estimator",
                 "feature_extractor": "depth estimator's image processor"}
_proven: weakref.WeakSet[Any] = weakref.WeakSet()  # the networks (modules, processors) that ran once


@contextlib.contextmanager
def first_call(models: Any, network: str, part: Any = None) -> Iterator[None]:
    """Run one call of ``models``' ``network`` (a key of :data:`NETWORK_NAMES`; ``part``: the object
    that runs, default the network itself, e.g. the VAE's decoder for a decode).

    Until that object has run once, an exception from inside it is what a malformed model folder
    gives (a config its weights or the other networks do not fit): it is raised as one line,
    "<model>: its UNet failed on its first call: <reason>", a :class:`ModelLoadError` with the
    original exception chained as its ``__cause__``. Out of memory, interrupts and P2VErrors pass
    unchanged, and so does every error once the object has run: that is not the folder's doing."""
    key = part if part is not None else getattr(models, network)
    if key in _proven:
        yield
        return
    try:
        yield
    except P2VError:
        raise
    except Exception as exc:
        if isinstance(exc, MemoryError) or is_out_of_memory(exc):
            raise
        label = getattr(models, "label", "") or f"model '{getattr(models, 'source', '?')}'"
        raise ModelLoadError(f"{label}: its {NETWORK_NAMES[network]} failed on its first call: "
                             f"{one_line(exc, kind=True)}") from exc
    _proven.add(key)


# --------------------------------------------------------------------------------------
# helpers


def _check_pipeline_folder(folder: Path, label: str) -> None:
    """Raise a one-line ModelLoadError unless ``folder`` looks like a depth pipeline."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{label} is not a diffusers pipeline folder: it has no model_index.json")
    try:
        spec = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{label} has an unreadable model_index.json: {one_line(exc)}") from None
    cls = spec.get("_class_name")
    if cls != PIPELINE_CLASS:
        raise ModelLoadError(
            f"{label} holds a {cls or 'unknown'} pipeline, not a {PIPELINE_CLASS} (Stable Diffusion 2 depth) pipeline"
        )
    missing = [
        c
        for c in PIPELINE_COMPONENTS
        if not isinstance(spec.get(c), list) or spec[c][0] is None or not (folder / c).is_dir()
    ]
    if missing:
        raise ModelLoadError(
            f"{label} is not a complete Stable Diffusion depth pipeline: missing " + ", ".join(f"{c}/" for c in missing)
        )
    check_predicts_noise(folder, label)


def _check_fit(parts: Mapping[str, Any], label: str) -> None:
    """Raise a one-line ModelLoadError unless the networks' configs fit together as a depth model's:
    every layer a config names has weights; the UNet takes the VAE's latent channels + 1 (depth) and
    predicts the latent channels, attends to text as wide as the text encoder's hidden states, and the
    tokenizer's length fits the text encoder's positions. Read from the configs: certain, and before
    any call."""
    for name in ("unet", "vae", "text_encoder", "depth_estimator"):  # left on the meta device by the loader
        empty = next((n for n, t in (*parts[name].named_parameters(), *parts[name].named_buffers()) if t.is_meta), None)
        if empty is not None:
            raise ModelLoadError(f"{label}: its {NETWORK_NAMES[name]}'s config has layers its weights file lacks "
                                 f"(e.g. {empty!r}): the config and the weights are of different models")
    unet, vae, text = parts["unet"].config, parts["vae"].config, parts["text_encoder"].config
    latent = int(vae.latent_channels)
    if int(unet.in_channels) != latent + 1:
        raise ModelLoadError(
            f"{label}: its UNet takes {unet.in_channels} input channels; a depth model's takes {latent + 1} "
            f"({latent} latent + 1 depth), as stabilityai/stable-diffusion-2-depth's"
        )
    if int(unet.out_channels) != latent:
        raise ModelLoadError(f"{label}: its UNet predicts {unet.out_channels} channels; its VAE's latents have "
                             f"{latent}")
    cross = unet.cross_attention_dim
    widths = set(cross) if isinstance(cross, list | tuple) else {cross}
    if getattr(unet, "encoder_hid_dim", None) is None and widths != {int(text.hidden_size)}:
        raise ModelLoadError(
            f"{label}: its text encoder's hidden size is {text.hidden_size}, but its UNet attends to text "
            f"{'/'.join(str(w) for w in sorted(widths))} wide (cross_attention_dim)"
        )
    length, positions = int(parts["tokenizer"].model_max_length), int(text.max_position_embeddings)
    if length > positions:
        raise ModelLoadError(
            f"{label}: its tokenizer makes {length} tokens (model_max_length), more than its text encoder's "
            f"{positions} positions"
        )


def _load_pipeline_folder(folder: Path, label: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Load the components of a depth pipeline folder; returns them by name."""
    _check_pipeline_folder(folder, label)
    # The feature extractor is loaded on its own: SD2-depth's model_index.json names
    # `DPTFeatureExtractor`, which transformers 5 no longer has (diffusers fails on that name
    # even when the object is passed in), and its preprocessor config reads fine as a
    # DPTImageProcessor.
    try:
        with quiet_loading():
            from diffusers import DDIMScheduler, StableDiffusionDepth2ImgPipeline

            pipe = StableDiffusionDepth2ImgPipeline.from_pretrained(
                str(folder),
                dtype={"default": dtype, "depth_estimator": torch.float32},
                feature_extractor=None,
                local_files_only=True,
            )
            feature_extractor = image_processor_class("DPTImageProcessor").from_pretrained(
                str(folder / "feature_extractor")
            )
            scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    except Exception as exc:
        raise ModelLoadError(f"could not load {label}: {one_line(exc)}") from None

    parts: dict[str, Any] = {
        "vae": pipe.vae,
        "unet": pipe.unet,
        "text_encoder": pipe.text_encoder,
        "tokenizer": pipe.tokenizer,
        "scheduler": scheduler,
        "depth_estimator": pipe.depth_estimator,
        "feature_extractor": feature_extractor,
    }
    _check_fit(parts, label)
    try:
        # dtypes were set at load (depth estimator fp32); move only, so diffusers' "keep
        # these modules in fp32" logic is not undone by a cast.
        for name in ("vae", "unet", "text_encoder", "depth_estimator"):
            parts[name] = parts[name].to(device)
    except Exception as exc:
        raise ModelLoadError(f"could not move {label} to {device}: {one_line(exc)}") from None
    for name in ("vae", "unet", "text_encoder", "depth_estimator"):
        parts[name].eval()
        parts[name].requires_grad_(False)
    return parts


# --------------------------------------------------------------------------------------
# public API


def load_models(
    model: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Models:
    """Load the SD2-depth model set.

    ``model``: ``"tiny"`` (random-weight test set, built on first use under the p2v cache), ``"mini"``
    (the small trained set shipped in the package, :func:`mini_model_dir`),
    an existing local diffusers folder, or a Hugging Face hub id (from the local hub cache;
    downloaded if missing and the hub is reachable). Raises ``ModelLoadError`` with a
    one-line message on any failure.
    """
    dev = resolve_device(device)
    model = str(model)

    if model == TINY:
        from p2v_fast.weights.tiny import tiny_model_dir

        try:
            folder = tiny_model_dir()
        except Exception as exc:
            raise ModelLoadError(f"could not build the tiny model set: {one_line(exc)}") from None
        try:
            label = f"tiny model folder '{folder}'"
            parts = _load_pipeline_folder(folder, label, dev, dtype)
        except ModelLoadError as exc:  # damaged in a way its build records cannot see (or built before them)
            raise ModelLoadError(f"{exc}; delete that folder and p2v rebuilds it") from None
        return Models(**parts, source=TINY, local_dir=folder, device=dev, dtype=dtype, label=label)
    if model == MINI:
        folder = mini_model_dir()
        label = f"mini model folder '{folder}'"
        parts = _load_pipeline_folder(folder, label, dev, dtype)
        return Models(**parts, source=MINI, local_dir=folder, device=dev, dtype=dtype, label=label)

    check_model_source(model, (TINY, MINI))  # a file, a missing folder, neither a folder nor a hub id
    path = Path(model).expanduser()
    if path.is_dir():
        folder = path.resolve()
        label = f"model folder '{model}'"
        parts = _load_pipeline_folder(folder, label, dev, dtype)
        return Models(**parts, source=model, local_dir=folder, device=dev, dtype=dtype, label=label)

    with quiet_loading():
        from diffusers import StableDiffusionDepth2ImgPipeline

    def fetch(local_only: bool) -> Path:
        return Path(StableDiffusionDepth2ImgPipeline.download(model, local_files_only=local_only))

    snapshot = from_hub(model, fetch)
    label = f"model '{model}' (cached at {snapshot})"
    parts = _load_pipeline_folder(snapshot, label, dev, dtype)
    return Models(**parts, source=model, local_dir=None, device=dev, dtype=dtype, label=label)


def _load_captioner(local_dir: Path | None, device: torch.device, dtype: torch.dtype,
                    captioner: str | None = None) -> tuple[Any, Any]:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from p2v_fast.weights.hub import load_from_hub_or_folder

    cap_dtype = dtype if device.type == "cuda" else torch.float32

    def load(src: str, local_only: bool) -> tuple[Any, Any]:
        image_processor = image_processor_class("BlipImageProcessor").from_pretrained(src, local_files_only=local_only)
        processor = BlipProcessor.from_pretrained(src, image_processor=image_processor, local_files_only=local_only)
        with quiet_loading():
            model = BlipForConditionalGeneration.from_pretrained(src, dtype=cap_dtype, local_files_only=local_only)
        return model, processor

    own = own_captioner(local_dir) if captioner is None else None
    if own is not None:
        try:
            model, processor = load(str(own), True)
        except Exception as exc:
            raise ModelLoadError(f"could not load the captioner in '{own}': {one_line(exc)}") from None
    else:
        model, processor = load_from_hub_or_folder(captioner or DEFAULT_CAPTIONER, load, CAPTIONER_INSTEAD)
    try:
        model = model.to(device).eval()
    except Exception as exc:
        raise ModelLoadError(f"could not move the captioner to {device}: {one_line(exc)}") from None
    model.requires_grad_(False)
    return model, processor


# --------------------------------------------------------------------------------------
# identity: what names a model set (inversion cache keys, engine manifests)


def model_identity(models) -> str:
    """What names the weights: 'tiny', a hub id, or an absolute local path."""
    if models.local_dir is not None and models.source != "tiny":
        return str(Path(models.local_dir).resolve())
    return str(models.source)


@dataclass(frozen=True)
class ModelId:
    """What exported graphs were made from: ``source`` as the user named it, ``digest`` of the
    weights' identity (:func:`model_identity`) and every exported component's config."""

    source: str
    digest: str

    def to_dict(self) -> dict:
        return {"source": self.source, "digest": self.digest}


_NOT_IDENTITY = ("transformers_version", "dtype", "torch_dtype")  # set by loading, not by the model


def _clean_config(d: Mapping) -> dict:
    return {k: _clean_config(v) if isinstance(v, Mapping) else v for k, v in d.items()
            if not (isinstance(k, str) and (k.startswith("_") or k in _NOT_IDENTITY))}


def component_config(module) -> dict:
    """A module's config (diffusers FrozenDict or transformers config, nested configs included)
    without private keys or what loading sets (dtype, library version)."""
    cfg = getattr(module, "config", None)
    if cfg is None:
        return {}
    return _clean_config(dict(cfg) if isinstance(cfg, Mapping) else cfg.to_dict())


def _model_id(source: str, identity: str, unet, vae, depth) -> ModelId:
    fields = {"identity": identity, "unet": component_config(unet), "vae": component_config(vae),
              "depth": component_config(depth)}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return ModelId(str(source), digest)


def model_id(models) -> ModelId:
    """:class:`ModelId` of a loaded :class:`Models`."""
    return _model_id(models.source, model_identity(models), models.unet, models.vae, models.depth_estimator)


def model_id_at(model: str) -> ModelId:
    """:class:`ModelId` of ``model`` (named as for :func:`load_models`) from its config files
    alone: no weights are loaded and nothing is downloaded (the UNet and VAE are built on the
    meta device, the depth estimator's config is read). Raises :class:`ModelLoadError` when the
    model is not available here. Equals ``model_id(load_models(model))``."""
    from types import SimpleNamespace

    model = str(model)
    if model == TINY:
        from p2v_fast.weights.tiny import tiny_model_dir

        folder, identity = tiny_model_dir(), TINY
    elif model == MINI:
        folder = mini_model_dir()
        identity = str(folder)
    elif Path(model).expanduser().is_dir():
        folder = Path(model).expanduser().resolve()
        identity = str(folder)
    else:
        if looks_like_path(model) or not looks_like_repo_id(model):
            raise ModelLoadError(f"model '{model}' is not available here (no such folder)")
        try:
            with quiet_loading():
                from diffusers import StableDiffusionDepth2ImgPipeline

                folder = Path(StableDiffusionDepth2ImgPipeline.download(model, local_files_only=True))
        except Exception:
            raise ModelLoadError(f"model '{model}' is not in the hub cache here") from None
        identity = model
    try:
        with quiet_loading(), torch.device("meta"):
            from diffusers import AutoencoderKL, UNet2DConditionModel
            from transformers import AutoConfig

            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            depth = SimpleNamespace(config=AutoConfig.from_pretrained(folder / "depth_estimator"))
    except Exception as exc:
        raise ModelLoadError(f"could not read the configs of model '{model}': {one_line(exc)}") from None
    return _model_id(model, identity, unet, vae, depth)
