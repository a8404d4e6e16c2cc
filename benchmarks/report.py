"""Rendering of a :func:`benchmarks.bench.run_bench` report: rich tables and Markdown.

One table per backend. Rows are stages in seconds per frame (the median; min-max, every
repeat and the IQR are in the JSON); the edit has one section per schedule and latent-update
mode with the anchor frame, the propagated frames and the mean over the clip. A last table sets
the schedules side by side, per backend and latent-update mode. Tables fit :data:`WIDTH`
columns when the output is not a terminal (a log); the JSON has every number in full.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from p2v_fast.text import plural

#: Columns of the printed tables when the output is not a terminal.
WIDTH = 100
COLUMNS = ("stage", "s/frame", "UNet calls", "TFLOP", "TFLOP/s", "peak mem", "vs paper")

_STAGES = (("depth", "depth"), ("vae_encode", "VAE encode"), ("inversion", "inversion, cold cache"))


def _secs(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def _row(stage: str, summary: dict[str, Any] | None, calls: dict[str, float] | None = None,
         tflop: float | None = None, tflops: float | None = None, peak: object = None, memory: int | None = None,
         ratio: float | None = None) -> list[str]:
    back = f" + {calls['unet_backward']:.3g} bwd" if calls and calls["unet_backward"] else ""
    of_peak = f" ({100 * peak:.0f} %)" if isinstance(peak, float) else ""  # the exact share: in the JSON
    return [
        stage,
        _secs(summary["median"]) if summary else "n/a",
        f"{calls['unet_calls']:.3g}{back}" if calls else "",
        "" if tflop is None else f"{tflop / 1e12:.3g}",
        "" if tflops is None else f"{tflops:.3g}{of_peak}",
        "" if memory is None else f"{memory / 2**30:.2f} GiB",
        "" if ratio is None else f"{ratio:.3g}x",
    ]


def backend_rows(run: dict[str, Any]) -> list[list[str] | str]:
    """Rows of one backend's table; a plain string is a section heading."""
    st = run["stages"]
    out: list[list[str] | str] = []
    for key, label in _STAGES:
        s = st[key]
        if key == "inversion":
            out.append(_row(label, s["seconds_per_frame"], s["counters_per_frame"], s["unet_flops_per_frame"],
                            s["achieved_unet_tflops"], s["fraction_of_peak"], s["peak_memory_bytes"]))
        else:
            out.append(_row(label, s["seconds_per_frame"], memory=s["peak_memory_bytes"]))
    for e in run["edits"]:
        sp, unet, fl = e["seconds_per_frame"], e["unet_per_frame"], e["unet_flops_per_frame"]
        out.append(f"{e['schedule']} · {e['latent_update']}")  # an edit section
        if sp["anchor"] is not None:
            out.append(_row("  anchor frame", sp["anchor"], unet["anchor"], fl["anchor"]))
        if sp["propagated"] is not None:
            out.append(_row("  propagated frame", sp["propagated"], unet["propagated"], fl["propagated"]))
        out.append(_row("  mean over the clip", sp["edit"], unet["mean"], fl["mean"], e["achieved_unet_tflops"],
                        e["fraction_of_peak"], e["peak_memory_bytes"], e["paper_ratio"]))
    d = st["vae_decode"]
    out.append(_row("VAE decode", d["seconds_per_frame"], memory=d["peak_memory_bytes"]))
    return out


def title(report: dict[str, Any], backend: str) -> str:
    o, dev = report["options"], report["device"]
    return (f"p2v bench, {backend} backend: {report['model']['name']}, {o['size']}x{o['size']}, "
            f"{plural(o['steps'], 'step')}, {plural(report['clip']['frames'], 'frame')}, {report['dtype']} on "
            f"{dev['name']}")


def caption(report: dict[str, Any]) -> str:
    o, p = report["options"], report["paper"]
    return (f"per frame: seconds (median of {o['repeats']} after {o['warmup']} warm-up; min-max and every repeat "
            "in --json), UNet calls (+ backward passes) and UNet TFLOP; TFLOP/s (share of the device's peak, "
            f"where known). vs paper: (edit + VAE decode) / {p['seconds_per_frame']:g} s/frame ({p['device']}, "
            f"{p['size']}², {plural(p['steps'], 'step')}). Load average {report.get('load_average_start')} -> "
            f"{report.get('load_average_end')}.")


def rich_tables(report: dict[str, Any]) -> list[Table | str]:
    """One rich Table per backend that ran; an error line for one that did not."""
    out: list[Table | str] = []
    for run in report["runs"]:
        if "error" in run:
            out.append(f"[red]{run['backend']}: not run[/red]: {run['error']}")
            continue
        table = Table(title=title(report, run["backend"]), caption=caption(report), caption_justify="left",
                      box=box.SIMPLE_HEAD, pad_edge=False)
        for name in COLUMNS:
            table.add_column(name, justify="left" if name == "stage" else "right", no_wrap=True)
        for row in backend_rows(run):
            if isinstance(row, str):
                table.add_row(f"[bold]{row}[/bold]", end_section=False)
            else:
                table.add_row(*row)
        out.append(table)
        out.append(inversion_line(run))
    return out


def inversion_line(run: dict[str, Any]) -> str:
    """Where the inversion ran and its reconstruction error (p2v_fast.method.inversion.reconstruction_error)."""
    from p2v_fast.method.inversion import describe_reconstruction
    from p2v_fast.nets.runtime import describe_runtime

    inv = run["stages"]["inversion"]
    if "runs_on" not in inv:
        return ""
    return (f"{run['backend']}: inversion on {describe_runtime(inv['runs_on'])}; "
            f"{describe_reconstruction(inv.get('reconstruction'))}")


SCHEDULE_COLUMNS = ("backend", "update", "seq s/frame", "wave s/frame", "speed-up", "UNet calls/frame seq / wave",
                    "peak GiB seq / wave")


def schedule_rows(report: dict[str, Any]) -> list[list[str]]:
    """Sequential against wavefront, per backend and latent-update mode (edit medians)."""
    rows = []
    for run in report["runs"]:
        if "error" in run:
            continue
        edits = {(e["schedule"], e["latent_update"]): e for e in run["edits"]}
        for mode in dict.fromkeys(m for _, m in edits):
            seq, wave = edits.get(("sequential", mode)), edits.get(("wavefront", mode))
            if seq is None or wave is None:
                continue
            a, b = (e["seconds_per_frame"]["edit"]["median"] for e in (seq, wave))
            calls = (e["unet_per_frame"]["mean"]["unet_calls"] for e in (seq, wave))
            mem = (e["peak_memory_bytes"] / 2**30 for e in (seq, wave))
            rows.append([run["backend"], mode, _secs(a), _secs(b), f"{a / b:.2f}x" if b > 0 else "",
                         " / ".join(f"{c:.3g}" for c in calls), " / ".join(f"{m:.2f}" for m in mem)])
    return rows


UPDATE_COLUMNS = ("step", "t", "sqrt(abar_t)", "autograd RMS", "detached RMS", "detached at autograd's latents",
                  "autograd / detached, same latents")


def update_rows(run: dict[str, Any]) -> list[list[str]]:
    """The guided update's RMS per step in each mode (:func:`benchmarks.bench.update_rms_table`)."""
    u = run.get("update_rms")
    if not u:
        return []

    def cell(x: float | None) -> str:
        return "" if x is None else f"{x:.3g}"

    return [[str(s), str(t), f"{a:.3g}", cell(au), cell(de), cell(same), cell(r)]
            for s, t, a, au, de, same, r in zip(u["steps"], u["timesteps"], u["sqrt_abar"], u["autograd"],
                                                u["detached"], u["detached_at_autograd_latents"],
                                                u["autograd_over_detached_same_latents"], strict=True)]


def update_title(report: dict[str, Any], run: dict[str, Any]) -> str:
    return (f"{run['backend']}: guided update RMS per step, delta {run['update_rms']['delta']:.3g} "
            f"(--update-weight {report['config']['update_weight']:g} at {report['options']['size']}²); an ideal "
            "Gaussian denoiser would give autograd/detached = sqrt(abar_t)")


SPEEDUP_COLUMNS = ("speed-up", "call", "s/call", "min–max", "first call s", "vs eager", "max rel err vs eager")


def speedup_rows(report: dict[str, Any]) -> list[list[str]]:
    """Each PyTorch speed-up on its own (``p2v bench --speedups``)."""
    rows = []
    for name, row in report.get("speedups", {}).get("variants", {}).items():
        if "error" in row:
            rows.append([name, "not run", row["error"], "", "", "", ""])
            continue
        for kind, r in row.items():
            s = r["seconds_per_call"]
            rows.append([name, kind, _secs(s["median"]), f"{_secs(s['min'])}–{_secs(s['max'])}",
                         _secs(r["first_call_seconds"]), f"{r['speedup_vs_eager']:.2f}x",
                         f"{r['max_rel_err_vs_eager']:.1e}"])
    return rows


def speedup_title(report: dict[str, Any]) -> str:
    s = report["speedups"]
    h, w = s["latent_hw"]
    return (f"PyTorch speed-ups, each on its own: {report['model']['name']}, {8 * h}x{8 * w}, batch {s['batch']}, "
            f"{s['dtype']} on {report['device']['name']} (median of {s['repeats']} after {s['warmup']} warm-up)")


def print_report(console: Console, report: dict[str, Any]) -> None:
    """Print the tables, :data:`WIDTH` columns wide when the output is not a terminal (a pipe, a
    log file, a test runner) instead of rich's default 80, which would squash them."""
    if not console.is_terminal:
        console = Console(file=console.file, width=WIDTH, color_system=None)
    for item in rich_tables(report):
        console.print(item)
    rows = speedup_rows(report)
    if rows:
        table = Table(title=speedup_title(report), box=box.SIMPLE_HEAD, pad_edge=False)
        for name in SPEEDUP_COLUMNS:
            table.add_column(name, justify="left" if name in ("speed-up", "call") else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for run in report["runs"]:
        rows = [] if "error" in run else update_rows(run)
        if rows:
            table = Table(title=update_title(report, run), box=box.SIMPLE_HEAD, pad_edge=False)
            for name in UPDATE_COLUMNS:
                table.add_column(name, justify="right")
            for row in rows:
                table.add_row(*row)
            console.print(table)
    rows = schedule_rows(report)
    if rows:
        table = Table(title="sequential against wavefront (same result; edit seconds per frame, median)",
                      box=box.SIMPLE_HEAD, pad_edge=False)
        for name in SCHEDULE_COLUMNS:
            table.add_column(name, justify="left" if name in ("backend", "update") else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def markdown(report: dict[str, Any]) -> str:
    """The same tables in Markdown (for a README)."""
    lines: list[str] = []
    for run in report["runs"]:
        if "error" in run:
            lines += [f"{run['backend']}: not run: {run['error']}", ""]
            continue
        lines += [f"**{title(report, run['backend'])}**", "", "| " + " | ".join(COLUMNS) + " |",
                  "|---" * len(COLUMNS) + "|"]
        for row in backend_rows(run):
            cells = [f"*{row}*"] + [""] * (len(COLUMNS) - 1) if isinstance(row, str) else row
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", caption(report), "", inversion_line(run), ""]
    rows = speedup_rows(report)
    if rows:
        lines += [f"**{speedup_title(report)}**", "", "| " + " | ".join(SPEEDUP_COLUMNS) + " |",
                  "|---" * len(SPEEDUP_COLUMNS) + "|", *("| " + " | ".join(r) + " |" for r in rows), ""]
    for run in report["runs"]:
        rows = [] if "error" in run else update_rows(run)
        if rows:
            lines += [f"**{update_title(report, run)}**", "", "| " + " | ".join(UPDATE_COLUMNS) + " |",
                      "|---" * len(UPDATE_COLUMNS) + "|", *("| " + " | ".join(r) + " |" for r in rows), ""]
    rows = schedule_rows(report)
    if rows:
        lines += ["**sequential against wavefront**", "", "| " + " | ".join(SCHEDULE_COLUMNS) + " |",
                  "|---" * len(SCHEDULE_COLUMNS) + "|", *("| " + " | ".join(r) + " |" for r in rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.report BENCH.json``: print a saved report as Markdown."""
    import json
    import sys

    paths = sys.argv[1:] if argv is None else argv
    for path in paths:
        with open(path, encoding="utf-8") as f:
            print(markdown(json.load(f)))


if __name__ == "__main__":
    main()
