"""What the ONNX Runtime and TensorRT backends share: running exported graphs by name.

A :class:`GraphBackend` maps the :class:`~p2v_fast.nets.backends.Backend` calls onto the networks of
an engine folder (``export/``'s engine contract): it casts each input to the dtype the spec
names, splits batches larger than the engines' profile, and returns torch tensors. A
subclass only implements :meth:`GraphBackend._run` (one network, one batch). The folder's
``manifest.json`` is checked once, when the backend is made: the model must be the one the
graphs were exported from, and every file must be whole.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from p2v_fast.errors import EngineError
from p2v_fast.nets.backends import Backend, self_attention_refs
from p2v_fast.nets.manifest import DEFAULT_ENGINES, Manifest, check_model, check_size, read_manifest, rebuild_command
from p2v_fast.nets.specs import NETWORKS
from p2v_fast.weights.models import model_id


def engines_folder(engines: str | Path | None) -> Path:
    """The engine folder: ``engines`` or ``./engines``."""
    return Path(engines) if engines is not None else DEFAULT_ENGINES


def load_checked_manifest(models, folder: Path) -> Manifest:
    """The folder's manifest, checked against ``models`` and for every network in ``NETWORKS``."""
    manifest = read_manifest(folder)
    check_model(manifest, model_id(models), folder)
    missing = [n for n in NETWORKS if n not in manifest.networks]
    if missing:
        raise EngineError(f"'{folder}' lacks {', '.join(missing)}; rebuild: {rebuild_command(manifest, folder)}")
    return manifest


class GraphBackend(Backend):
    """Base of the backends that run exported graphs. Not differentiable."""

    supports_grad = False

    def __init__(self, models, folder: Path, manifest: Manifest, device: torch.device) -> None:
        dtype = torch.float16 if manifest.precision == "fp16" else torch.float32
        super().__init__(device, dtype)
        self.models = models
        self.folder = folder
        self.manifest = manifest
        self.specs = {name: entry.spec for name, entry in manifest.networks.items()}
        self.geometry = manifest.geometry
        self.max_batch: int | None = None  # engines with a profile split larger batches

    #: Which artifact of each network this backend runs: "onnx" graphs or TensorRT "engine"s.
    artifact = "onnx"

    def identity(self) -> dict[str, str]:
        """The base identity (precision = the graphs') plus a digest of the keys of the artifacts
        run: another export (precision, opset, model, wrapper) or engine build changes it."""
        import hashlib
        import json

        keys = {name: getattr(entry, self.artifact).key if getattr(entry, self.artifact) else None
                for name, entry in sorted(self.manifest.networks.items())}
        digest = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]
        return {**super().identity(), "graphs": digest}

    def check_frame_size(self, width: int, height: int) -> None:
        check_size(self.manifest, self.folder, None, height, width)

    @abstractmethod
    def _run(self, network: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run ``network`` on ``feeds`` (spec dtypes, contiguous, on ``self.device``); outputs by name."""

    def run(self, network: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run ``network`` on inputs named as in its spec (any float dtype/device); outputs by name."""
        spec = self.specs[network]
        cast = {
            t.name: feeds[t.name].to(device=self.device, dtype=getattr(torch, t.dtype)).contiguous()
            for t in spec.inputs
        }
        if spec.spatial:  # a frame size outside the exported profile is refused, with the command that widens it
            dims = spec.bind(self.geometry, {n: tuple(t.shape) for n, t in cast.items()})
            check_size(self.manifest, self.folder, None, dims["H"], dims["W"])
        batch = int(next(iter(cast.values())).shape[0])
        step = self.max_batch or batch
        if batch <= step:
            return self._run(network, cast)
        parts = [self._run(network, {n: t[i : i + step] for n, t in cast.items()}) for i in range(0, batch, step)]
        return {name: torch.cat([p[name] for p in parts]) for name in spec.output_names}

    def unet(self, sample, timestep, encoder_hidden_states, refs: Sequence[torch.Tensor] | None = None,
             self_ref: torch.Tensor | None = None):
        """One call of the ``unet`` graph. ``refs`` None (every sample attends to itself, as the
        anchor and inversion do): zero refs, every sample selected away from them (``self_ref`` 1)."""
        self.counter.unet_calls += 1
        self.counter.unet_samples += sample.shape[0]
        spec, batch, g = self.specs["unet"], sample.shape[0], self.geometry
        if refs is None:
            shapes = list(zip(g.tokens(sample.shape[-2], sample.shape[-1]), g.feature_channels, strict=True))
            refs, self_ref = self_attention_refs(shapes, batch, getattr(torch, spec.tensor("ref_0").dtype), self.device)
        elif self_ref is None:
            self_ref = torch.zeros(batch, device=self.device)
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states,
                 "self_ref": self_ref, **{f"ref_{k}": r for k, r in enumerate(refs)}}
        out = self.run("unet", feeds)
        return out["noise_pred"].float(), [out[f"feat_{k}"] for k in range(g.n_layers)]

    def vae_encode(self, images):
        self.counter.vae_encode += images.shape[0]
        return self.run("vae_encoder", {"images": images})["latent"].float()

    def vae_decode(self, latents):
        self.counter.vae_decode += latents.shape[0]
        return self.run("vae_decoder", {"latent": latents})["images"].float()

    def depth(self, pixel_values):
        self.counter.depth += pixel_values.shape[0]
        return self.run("depth", {"pixel_values": pixel_values})["predicted_depth"].float()


