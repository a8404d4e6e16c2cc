"""Export the networks (unet, vae_encoder, vae_decoder, depth) to ONNX and build TensorRT engines: ``export_engines``.

Stages per network, each skipped when its artifact is current (its key, see
:mod:`p2v_fast.nets.manifest`, matches and its file is whole) unless ``force``
(:mod:`export.engines`):

1. ONNX: export through the wrapper module, clean, check, validate against PyTorch in ONNX
   Runtime (:mod:`export.onnx_export`).
2. TensorRT (``format="tensorrt"``): build the engine with the spec's profile
   (:mod:`export.tensorrt_build`).

``manifest.json`` is rewritten after every finished network, so an interrupted export keeps
what it finished. ``p2v export`` is the CLI over this function.
"""

from __future__ import annotations

from export.engines import ExportReport, StageResult, export_engines
from p2v_fast.nets.export_options import CLEANERS, DEFAULT_ENGINES, EXPORTERS, FORMATS, WIDEST_DEFAULT, ExportOptions

__all__ = ["CLEANERS", "DEFAULT_ENGINES", "EXPORTERS", "FORMATS", "WIDEST_DEFAULT", "ExportOptions", "ExportReport",
           "StageResult", "export_engines"]
