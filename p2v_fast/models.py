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
is not there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import BackendUnavailableError, ModelLoadError

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-depth"
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
TINY = "tiny"

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

#: Seconds to wait for the hub before declaring it unreachable.
HUB_TIMEOUT_S = 10.0


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
    _captioner: tuple[Any, Any] | None = field(default=None, init=False, repr=False)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each axis (8 for SD2 and the tiny set)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def load_captioner(self) -> tuple[Any, Any]:
        """The BLIP captioner ``(model, processor)``, loaded on first use and then kept.

        For the tiny set, or a local folder with a ``captioner/`` subfolder, that subfolder;
        otherwise ``Salesforce/blip-image-captioning-base`` from the hub cache (downloaded
        if the hub is reachable). fp32 on the CPU, ``dtype`` on CUDA.
        """
        if self._captioner is None:
            self._captioner = _load_captioner(self.local_dir, self.device, self.dtype)
        return self._captioner


# --------------------------------------------------------------------------------------
# helpers


def _one_line(exc: BaseException, limit: int = 240) -> str:
    """First non-empty line of an exception's message, shortened."""
    text = str(exc).strip() or type(exc).__name__
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), text)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _looks_like_path(model: str) -> bool:
    """True for strings meant as a folder: ``./x``, ``/x``, ``~/x``, ``a/b/c``, ``a\\b``.

    A plain ``owner/name`` is read as a hub id even though it contains ``/``.
    """
    if model.startswith((".", "/", "~")):
        return True
    if any(sep and sep != "/" and sep in model for sep in (os.sep, os.altsep)):
        return True
    return "/" in model and not _looks_like_repo_id(model)


def _looks_like_repo_id(model: str) -> bool:
    """``owner/name`` with hub-legal characters and no path-only syntax."""
    import re

    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*", model) is not None


def _hub_offline() -> bool:
    val = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    if val in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old/new huggingface_hub
        return False


def _not_cached_message(repo_id: str, instead: str = "use --model tiny") -> str:
    why = "offline mode (HF_HUB_OFFLINE) is on" if _hub_offline() else "the hub cannot be reached"
    return (
        f"model '{repo_id}' is not in the local Hugging Face cache and {why}; download it on a "
        f"connected machine, pass a local folder, or {instead}"
    )


def _probe_hub(repo_id: str, instead: str = "use --model tiny") -> None:
    """Fail fast, with one line, when the hub is unreachable or the repo does not exist."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
    )

    try:
        model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ModelLoadError(
            f"model '{repo_id}' is gated on the Hugging Face hub; accept its licence and log "
            "in (hf auth login), or pass a local folder"
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"model '{repo_id}' was not found on the Hugging Face hub (check the id, or log in "
            "if it is private), and it is not a local folder"
        ) from None
    except HFValidationError:
        raise ModelLoadError(f"model '{repo_id}' is neither a local folder nor a valid Hugging Face repo id") from None
    except Exception:
        raise ModelLoadError(_not_cached_message(repo_id, instead)) from None


def _from_hub(repo_id: str, load: Callable[[bool], Any], instead: str = "use --model tiny") -> Any:
    """Run ``load(local_files_only)``: from the cache first, then online if reachable (one
    probe with a short timeout, so an offline machine fails at once instead of retrying for
    half a minute). ``instead``: the way around a model that cannot be had, for the error."""
    if not _looks_like_repo_id(repo_id):
        raise ModelLoadError(
            f"model '{repo_id}' is neither a local folder nor a Hugging Face repo id (owner/name); "
            "pass a hub id, a local folder or 'tiny'"
        )
    try:
        return load(True)
    except ModelLoadError:
        raise
    except Exception:
        pass  # not (fully) cached: try the hub below
    if _hub_offline():
        raise ModelLoadError(_not_cached_message(repo_id, instead))
    _probe_hub(repo_id, instead)
    try:
        return load(False)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not download model '{repo_id}': {_one_line(exc)}") from None


def load_from_hub_or_folder(model: str, load: Callable[[str, bool], Any], instead: str) -> Any:
    """``load(source, local_files_only)`` for a local folder (as is) or a hub id (the cache first,
    then the hub if it answers; see :func:`_from_hub`). Every failure is one ModelLoadError line."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        try:
            return load(str(folder), True)
        except Exception as exc:
            raise ModelLoadError(f"could not load '{model}': {_one_line(exc)}; {instead}") from None
    if _looks_like_path(model):
        raise ModelLoadError(f"model folder '{model}' does not exist; {instead}")
    return _from_hub(model, lambda local_only: load(model, local_only), instead)


def fetch_url_file(url: str, folder: Path, what: str, instead: str, timeout: float = HUB_TIMEOUT_S) -> Path:
    """The file ``url`` names, from ``folder`` (a download cache such as torch hub's) or
    downloaded into it. Offline (HF_HUB_OFFLINE) or when the host does not answer within
    ``timeout`` seconds: one ModelLoadError line at once, never a long wait."""
    import shutil
    import tempfile
    import urllib.request
    from urllib.parse import urlparse

    target = folder / Path(urlparse(url).path).name
    if target.is_file():
        return target
    host = urlparse(url).netloc or url
    if _hub_offline():
        raise ModelLoadError(f"{what} is not downloaded ({target} is missing) and offline mode (HF_HUB_OFFLINE) "
                             f"is on; {instead}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=timeout) as response:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=folder)
            try:
                with open(fd, "wb") as f:
                    shutil.copyfileobj(response, f)
                Path(tmp).replace(target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except (TimeoutError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ModelLoadError(f"{what} is not downloaded and {host} cannot be reached ({_one_line(reason)}); "
                             f"{instead}") from None
    return target


def image_processor_class(name: str):
    """``<name>`` (torchvision backend) if torchvision is installed, else ``<name>Pil``.

    transformers 5 falls back to the PIL class anyway and warns each time; choosing it here
    keeps the output quiet and the choice explicit.
    """
    import transformers
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available() and hasattr(transformers, name + "Pil"):
        return getattr(transformers, name + "Pil")
    return getattr(transformers, name)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide diffusers'/transformers' per-component progress bars and load-time advice.

    Hub download progress (huggingface_hub) is left alone: it is useful. Prior settings are
    restored on exit.
    """
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    d_bar, t_bar = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    d_level, t_level = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity(max(d_level, dlog.ERROR))
    tlog.set_verbosity(max(t_level, tlog.ERROR))
    try:
        yield
    finally:
        dlog.set_verbosity(d_level)
        tlog.set_verbosity(t_level)
        if d_bar:
            dlog.enable_progress_bar()
        if t_bar:
            tlog.enable_progress_bar()


def _check_pipeline_folder(folder: Path, label: str) -> None:
    """Raise a one-line ModelLoadError unless ``folder`` looks like a depth pipeline."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{label} is not a diffusers pipeline folder: it has no model_index.json")
    try:
        spec = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{label} has an unreadable model_index.json: {_one_line(exc)}") from None
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
        raise ModelLoadError(f"could not load {label}: {_one_line(exc)}") from None

    parts: dict[str, Any] = {
        "vae": pipe.vae,
        "unet": pipe.unet,
        "text_encoder": pipe.text_encoder,
        "tokenizer": pipe.tokenizer,
        "scheduler": scheduler,
        "depth_estimator": pipe.depth_estimator,
        "feature_extractor": feature_extractor,
    }
    try:
        # dtypes were set at load (depth estimator fp32); move only, so diffusers' "keep
        # these modules in fp32" logic is not undone by a cast.
        for name in ("vae", "unet", "text_encoder", "depth_estimator"):
            parts[name] = parts[name].to(device)
    except Exception as exc:
        raise ModelLoadError(f"could not move {label} to {device}: {_one_line(exc)}") from None
    for name in ("vae", "unet", "text_encoder", "depth_estimator"):
        parts[name].eval()
        parts[name].requires_grad_(False)
    return parts


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BackendUnavailableError(f"device '{device}' is not valid: {_one_line(exc)}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device '{device}' requested but CUDA is not available here")
    return dev


# --------------------------------------------------------------------------------------
# public API


def load_models(
    model: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Models:
    """Load the SD2-depth model set.

    ``model``: ``"tiny"`` (random-weight test set, built on first use under the p2v cache),
    an existing local diffusers folder, or a Hugging Face hub id (from the local hub cache;
    downloaded if missing and the hub is reachable). Raises ``ModelLoadError`` with a
    one-line message on any failure.
    """
    dev = _resolve_device(device)
    model = str(model)

    if model == TINY:
        from .tiny import tiny_model_dir

        try:
            folder = tiny_model_dir()
        except Exception as exc:
            raise ModelLoadError(f"could not build the tiny model set: {_one_line(exc)}") from None
        parts = _load_pipeline_folder(folder, f"tiny model folder '{folder}'", dev, dtype)
        return Models(**parts, source=TINY, local_dir=folder, device=dev, dtype=dtype)

    path = Path(model).expanduser()
    if path.is_dir():
        folder = path.resolve()
        parts = _load_pipeline_folder(folder, f"model folder '{model}'", dev, dtype)
        return Models(**parts, source=model, local_dir=folder, device=dev, dtype=dtype)
    if path.exists():
        raise ModelLoadError(f"model '{model}' is a file, not a model folder or hub id")
    if _looks_like_path(model):
        raise ModelLoadError(f"model folder '{model}' does not exist")

    with quiet_loading():
        from diffusers import StableDiffusionDepth2ImgPipeline

    def fetch(local_only: bool) -> Path:
        return Path(StableDiffusionDepth2ImgPipeline.download(model, local_files_only=local_only))

    snapshot = _from_hub(model, fetch)
    parts = _load_pipeline_folder(snapshot, f"model '{model}' (cached at {snapshot})", dev, dtype)
    return Models(**parts, source=model, local_dir=None, device=dev, dtype=dtype)


def _load_captioner(local_dir: Path | None, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    cap_dtype = dtype if device.type == "cuda" else torch.float32

    def load(src: str, local_only: bool) -> tuple[Any, Any]:
        image_processor = image_processor_class("BlipImageProcessor").from_pretrained(src, local_files_only=local_only)
        processor = BlipProcessor.from_pretrained(src, image_processor=image_processor, local_files_only=local_only)
        with quiet_loading():
            model = BlipForConditionalGeneration.from_pretrained(src, dtype=cap_dtype, local_files_only=local_only)
        return model, processor

    if local_dir is not None and (Path(local_dir) / "captioner").is_dir():
        src = Path(local_dir) / "captioner"
        try:
            model, processor = load(str(src), True)
        except Exception as exc:
            raise ModelLoadError(f"could not load the captioner in '{src}': {_one_line(exc)}") from None
    else:
        model, processor = _from_hub(DEFAULT_CAPTIONER, lambda lo: load(DEFAULT_CAPTIONER, lo),
                                     "pass --source-prompt (then no captioner is needed)")
    try:
        model = model.to(device).eval()
    except Exception as exc:
        raise ModelLoadError(f"could not move the captioner to {device}: {_one_line(exc)}") from None
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
        from .tiny import tiny_model_dir

        folder, identity = tiny_model_dir(), TINY
    elif Path(model).expanduser().is_dir():
        folder = Path(model).expanduser().resolve()
        identity = str(folder)
    else:
        if _looks_like_path(model) or not _looks_like_repo_id(model):
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
        raise ModelLoadError(f"could not read the configs of model '{model}': {_one_line(exc)}") from None
    return _model_id(model, identity, unet, vae, depth)
