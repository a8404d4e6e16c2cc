"""`p2v bench` as one library call: the options decide between the simulated plan
(``--plan``), the peers' end-to-end protocol (``--protocol``) and the timed stages (the
default); :func:`render_bench` prints whichever ran."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.options import DEFAULT_FRAMES, PLAN_FRAMES, BenchRequest, default_size
from p2v_fast.config import LATENT_UPDATES, SCHEDULES, EditConfig
from p2v_fast.errors import InputError
from p2v_fast.files import write_json_atomic
from p2v_fast.media.paths import check_report_path
from p2v_fast.progress import Progress


@dataclass(frozen=True)
class BenchRun:
    kind: str  # "plan", "protocol" or "stages"
    report: dict[str, Any]
    json_path: Path | None = None


def run_bench_command(request: BenchRequest, progress: Progress,
                      log: Callable[[str], None] = lambda m: None) -> BenchRun:
    """Run what ``p2v bench``'s options ask for and return its report (written to ``--json`` too)."""
    from benchmarks.bench import BenchOptions, run_bench

    r = request
    check_report_path(r.json_path, overwrite=r.overwrite, engines=r.engines)  # an existing file only with --overwrite
    if r.plan and r.protocol is not None:
        raise InputError("--plan simulates the wavefront and --protocol runs the edit; give one of them")
    if r.protocol is not None:
        return _protocol(r, log)
    size = default_size(r.model) if r.size is None else r.size
    steps = int(EditConfig.__dataclass_fields__["steps"].default) if r.steps is None else r.steps  # type: ignore[arg-type]
    frames = (PLAN_FRAMES if r.plan else DEFAULT_FRAMES) if r.frames is None else r.frames
    opts = BenchOptions(
        model=r.model, arch=r.arch, size=size, steps=steps, frames=frames, compile=r.compile,
        backends=r.backend or (() if r.speedups else ("torch",)), latent_updates=r.latent_update or LATENT_UPDATES,
        schedules=r.schedule or SCHEDULES, batch_frames=r.batch_frames, invert_batch=r.invert_batch,
        invert_dtype=r.invert_dtype, dtype=r.dtype, device=r.device, engines=r.engines, max_memory=r.max_memory,
        repeats=r.repeats, warmup=r.warmup, threads=r.threads, json_path=r.json_path, speedups=r.speedups,
    )  # every option checked, --plan or not
    if r.plan:
        from benchmarks.plan import CAPS, plan_report

        report = plan_report(frames, steps, size, r.dtype, caps=(r.batch_frames,) if r.batch_frames else CAPS,
                             arch=r.arch, model=r.model)
        if r.json_path is not None:
            write_json_atomic(r.json_path, report)
        return BenchRun("plan", report, r.json_path)
    return BenchRun("stages", run_bench(opts, progress), r.json_path)  # run_bench writes --json itself


def _protocol(r: BenchRequest, log: Callable[[str], None]) -> BenchRun:
    """``p2v bench --protocol NAME``: see benchmarks/protocol.py."""
    from benchmarks.protocol import ProtocolOptions, run_protocol
    from p2v_fast.config import check_threads
    from p2v_fast.nets.runtime import torch_threads

    assert r.protocol is not None
    overrides = {k: v for k, v in (("frames", r.frames), ("size", r.size), ("steps", r.steps)) if v is not None}
    if len(r.backend) > 1:
        raise InputError("--protocol runs one backend; give --backend once")
    check_threads(r.threads)
    opts = ProtocolOptions(name=r.protocol, model=r.model, arch=r.arch, device=r.device, dtype=r.dtype,
                           backend=(r.backend or ("torch",))[0], engines=r.engines,
                           latent_updates=r.latent_update or LATENT_UPDATES, compile=r.compile,
                           invert_dtype=r.invert_dtype, max_memory=r.max_memory, overrides=overrides)
    if not opts.faithful:
        log(f"not the protocol: {overrides} overrides {r.protocol}'s fixed workload; the report says so")
    with torch_threads(r.threads):
        report = run_protocol(opts, log=log)
    if r.json_path is not None:
        write_json_atomic(r.json_path, report)
    return BenchRun("protocol", report, r.json_path)


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
