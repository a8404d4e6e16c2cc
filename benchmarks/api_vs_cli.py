"""The README's Python API example against `p2v edit`, the same edit, each in a fresh process.

    python -m benchmarks.api_vs_cli [--runs 2] [--busy 2] [--frames 4] [--checkout DIR] [--json PATH]

The API side runs the README's example as written (the package docstring's copy, which
tests/test_docs.py keeps equal to the README's) in a folder holding the clip as ``in.mp4``; the
CLI side runs ``p2v edit in.mp4 PROMPT`` with the example's EditConfig arguments as options. Both
give the edit's seconds per frame (inversion excluded): the number the example prints and the
CLI's ``--json`` ``seconds_per_frame``. Neither process inherits OMP_WAIT_POLICY, OMP_NUM_THREADS or
TOKENIZERS_PARALLELISM (a user's plain environment); each reports the thread count and the OpenMP
spin count it ran with (libgomp's ``OMP_DISPLAY_ENV=VERBOSE``: 0 is passive waiting, 300000 its
default). ``--busy N`` keeps N CPU-bound processes running meanwhile (busy neighbours). A warm-up
run inverts the clip (cached for the others); then the sides alternate. ``--checkout`` times
another copy of the code (e.g. the main branch before a change). The JSON (default:
``benchmarks/results/DATE_api-vs-cli_COMMIT_busyN.json``) holds every run, the medians, the load average
before and after, the machine and the code's commit.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Variables a user's environment does not set, left out of both sides' environments.
UNSET = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "MKL_NUM_THREADS")
#: Printed at exit by both sides: the PyTorch thread count the run had (torch imported then, not before).
THREADS = "import atexit; atexit.register(lambda: print('threads', __import__('torch').get_num_threads()))\n"


def readme_example() -> str:
    """The README's API example (the package docstring's indented block after ``::``)."""
    import p2v_fast

    after = (p2v_fast.__doc__ or "").split("::\n", 1)[1].splitlines()
    end = next(i for i, ln in enumerate(after) if ln.strip() and not ln.startswith("    "))
    return "\n".join(ln[4:] for ln in after[:end]).strip() + "\n"


def cli_arguments(example: str) -> list[str]:
    """``edit in.mp4 PROMPT --option value ...``: the example's EditConfig(...) call as CLI options."""
    call = next(n for n in ast.walk(ast.parse(example)) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "EditConfig")
    kwargs = {str(k.arg): ast.literal_eval(k.value) for k in call.keywords}
    options = [x for k, v in kwargs.items() if k != "prompt" for x in (f"--{k.replace('_', '-')}", str(v))]
    return ["edit", "in.mp4", kwargs["prompt"], "-o", "out.mp4", "--overwrite", "--json", "out.json", *options]


def _run(side: str, example: str, folder: Path, env: dict[str, str]) -> dict[str, object]:
    if side == "api":
        code = THREADS + example
    else:
        code = f"{THREADS}import sys; sys.argv = ['p2v', *{cli_arguments(example)!r}]\nfrom cli import main; main()"
    for old in folder.glob("out*"):  # the example writes out.mp4 without overwrite=True
        old.unlink()
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"the {side} run failed:\n{p.stdout}\n{p.stderr}")
    if side == "api":
        m = re.search(r"([0-9.]+) s/frame", p.stdout)
        assert m, p.stdout
        per_frame = float(m.group(1))
    else:
        per_frame = float(json.loads((folder / "out.json").read_text())["seconds_per_frame"])
    spin = re.search(r"GOMP_SPINCOUNT = '(\d+)'", p.stderr)
    threads = re.search(r"^threads (\d+)$", p.stdout, re.M)
    return {"side": side, "seconds_per_frame": per_frame, "wall_s": round(wall, 2),
            "torch_threads": int(threads.group(1)) if threads else None,
            "gomp_spincount": int(spin.group(1)) if spin else None}


def _commit(checkout: Path) -> str:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=checkout,
                           capture_output=True, text=True).stdout.strip()
    return p.stdout.strip() + ("+changes" if dirty else "")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2, help="timed runs per side (after one warm-up run)")
    ap.add_argument("--busy", type=int, default=2, help="CPU-bound processes running meanwhile")
    ap.add_argument("--frames", type=int, default=4, help="frames of the clip")
    ap.add_argument("--checkout", type=Path, default=ROOT, help="the copy of the code to time")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from benchmarks.hardware import machine_info
    from p2v_fast.media.samples import make_sample_clip
    from p2v_fast.weights.tiny import tiny_model_dir

    folder = Path(tempfile.mkdtemp(prefix="p2v-api-vs-cli-"))
    cache = folder / "cache"
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update(P2V_CACHE=str(cache), PYTHONPATH=str(args.checkout.resolve()), OMP_DISPLAY_ENV="VERBOSE")
    os.environ["P2V_CACHE"] = str(cache)
    tiny_model_dir()  # built once, before the clock
    make_sample_clip(folder / "in.mp4", n_frames=args.frames, with_audio=False)
    example = readme_example()

    load_before = os.getloadavg()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    runs = []
    try:
        _run("cli", example, folder, env)  # warm-up: inverts the clip into the cache
        for _ in range(args.runs):  # alternating, so a change in the machine's load hits both
            runs += [_run("api", example, folder, env), _run("cli", example, folder, env)]
        load_after = os.getloadavg()
    finally:
        for p in busy:
            p.kill()
            p.wait()
        shutil.rmtree(folder, ignore_errors=True)

    median = {side: statistics.median(float(r["seconds_per_frame"]) for r in runs if r["side"] == side)  # type: ignore[arg-type]
              for side in ("api", "cli")}
    report = {
        "what": "README API example vs p2v edit, same edit, fresh processes; s/frame = the edit loop (inversion "
                "cached and excluded)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "code": {"checkout": str(args.checkout.resolve()), "commit": _commit(args.checkout)},
        "example": example, "cli": cli_arguments(example), "frames": args.frames, "busy_processes": args.busy,
        "load_average_before": load_before, "load_average_after": load_after, "machine": machine_info(),
        "median_seconds_per_frame": median, "api_over_cli": round(median["api"] / median["cli"], 2), "runs": runs,
    }
    day = datetime.date.today().isoformat()
    name = f"{day}_api-vs-cli_{report['code']['commit']}_busy{args.busy}.json"  # type: ignore[index]
    path = args.json or ROOT / "benchmarks" / "results" / name
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"API {median['api']:.2f} s/frame, CLI {median['cli']:.2f} s/frame (x{report['api_over_cli']}); "
          f"{args.busy} busy processes, load {load_before[0]:.1f} -> {load_after[0]:.1f}; wrote {path}")


if __name__ == "__main__":
    main()
