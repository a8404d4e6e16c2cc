"""`p2v bench` as one library call: the options decide between the simulated plan
(``--plan``), the peers' end-to-end protocol (``--protocol``) and the timed stages (the
default); :func:`render_bench` prints whichever ran."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from p2v_fast.config import LATENT_UPDATES, SCHEDULES, EditConfig
from p2v_fast.errors import InputError
from p2v_fast.files import write_json_atomic
from p2v_fast.media.paths import check_json_path
from p2v_fast.progress import Progress

#: Frames of the synthetic clip when --frames is not given (1 anchor + 3 propagated).
DEFAULT_FRAMES = 4


@dataclass(frozen=True)
class BenchRun:
    kind: str  # "plan", "protocol" or "stages"
    report: dict[str, Any]
    json_path: Path | None = None


def default_size(model: str | None) -> int:
    """512, or 128 for the tiny model (at 512 it takes ~45 min on 2 CPU cores; its timings mean little)."""
    return 128 if model == "tiny" else 512


def run_bench_command(*, plan: bool = False, protocol: str | None = None, model: str | None = None,
                      arch: str | None = None, size: int | None = None, steps: int | None = None,
                      frames: int | None = None, backends: tuple[str, ...] = (),
                      latent_updates: tuple[str, ...] = (), schedules: tuple[str, ...] = (),
                      batch_frames: int | None = None, invert_batch: int | None = None,
                      invert_dtype: str = "fp32", max_memory: int | None = None, dtype: str = "auto",
                      device: str = "auto", engines: Path | None = None, repeats: int = 3, warmup: int = 1,
                      threads: int | None = None, speedups: tuple[str, ...] = (), compile: bool = False,
                      json_path: Path | None = None, progress: Progress,
                      log: Callable[[str], None] = lambda m: None) -> BenchRun:
    """Run what ``p2v bench``'s options ask for and return its report (written to ``json_path`` too)."""
    from benchmarks.bench import BenchOptions, run_bench

    if json_path is not None:
        check_json_path(json_path)
    if plan and protocol is not None:
        raise InputError("--plan simulates the wavefront and --protocol runs the edit; give one of them")
    if protocol is not None:
        return _protocol(protocol, model, arch, size, steps, frames, backends, latent_updates, dtype, device,
                         engines, threads, compile, invert_dtype, json_path, max_memory, log)
    size = default_size(model) if size is None else size
    steps = int(EditConfig.__dataclass_fields__["steps"].default) if steps is None else steps  # type: ignore[arg-type]
    frames = DEFAULT_FRAMES if frames is None else frames
    opts = BenchOptions(
        model=model, arch=arch, size=size, steps=steps, frames=frames, compile=compile,
        backends=backends or (() if speedups else ("torch",)), latent_updates=latent_updates or LATENT_UPDATES,
        schedules=schedules or SCHEDULES, batch_frames=batch_frames, invert_batch=invert_batch,
        invert_dtype=invert_dtype, dtype=dtype, device=device, engines=engines, max_memory=max_memory,
        repeats=repeats, warmup=warmup, threads=threads, json_path=json_path, speedups=speedups,
    )  # every option checked, --plan or not
    if plan:
        from benchmarks.plan import CAPS, plan_report

        report = plan_report(frames, steps, size, dtype, caps=(batch_frames,) if batch_frames else CAPS,
                             arch=arch, model=model)
        if json_path is not None:
            write_json_atomic(json_path, report)
        return BenchRun("plan", report, json_path)
    return BenchRun("stages", run_bench(opts, progress), json_path)  # run_bench writes --json itself


def _protocol(name: str, model, arch, size, steps, frames, backends, latent_updates, dtype, device, engines,
              threads, compile, invert_dtype, json_path, max_memory, log) -> BenchRun:
    """``p2v bench --protocol NAME``: see benchmarks/protocol.py."""
    from benchmarks.protocol import ProtocolOptions, run_protocol
    from p2v_fast.config import check_threads
    from p2v_fast.nets.runtime import torch_threads

    overrides = {k: v for k, v in (("frames", frames), ("size", size), ("steps", steps)) if v is not None}
    if len(backends) > 1:
        raise InputError("--protocol runs one backend; give --backend once")
    check_threads(threads)
    opts = ProtocolOptions(name=name, model=model, arch=arch, device=device, dtype=dtype,
                           backend=(backends or ("torch",))[0], engines=engines,
                           latent_updates=latent_updates or LATENT_UPDATES, compile=compile,
                           invert_dtype=invert_dtype, max_memory=max_memory, overrides=overrides)
    if not opts.faithful:
        log(f"not the protocol: {overrides} overrides {name}'s fixed workload; the report says so")
    with torch_threads(threads):
        report = run_protocol(opts, log=log)
    if json_path is not None:
        write_json_atomic(json_path, report)
    return BenchRun("protocol", report, json_path)


def render_bench(console: Console, run: BenchRun) -> None:
    """Print the table of whichever ``p2v bench`` ran."""
    from p2v_fast.report import print_wrote, wide

    if run.kind == "plan":
        from benchmarks.plan import plan_table

        wide(console).print(plan_table(run.report))
        return
    if run.kind == "protocol":
        from benchmarks.protocol import protocol_table

        wide(console).print(protocol_table(run.report))
    else:
        from benchmarks.report import print_report

        print_report(console, run.report)
    print_wrote(console, run.json_path)
