"""How long `p2v` takes to refuse a bad command line, and to print --help (issue 28 item 1).

    python -m benchmarks.startup [--repeats 5] [--baseline OLD_CHECKOUT] [--json out.json]

Each case runs as `python -m cli ...` in a fresh process (what a user waits for: interpreter start,
imports, the check, the one ``error:`` line), ``--repeats`` times, cases interleaved; the median
wall-clock and CPU seconds (user + system of the child) are reported. On a busy machine the wall
time grows with the load; the CPU time is close to what a quiet machine's wall time would be.
``--baseline``: another checkout of the project (e.g. ``git archive`` of an older commit) timed
the same way, alternating with this one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: name -> argv ({missing}, {clip}, {tmp} filled in); every case but the helps is refused.
CASES = {
    "help": ["--help"],
    "edit --help": ["edit", "--help"],
    "edit: missing input": ["edit", "{missing}", "a swan"],
    "edit: bad output extension": ["edit", "{clip}", "a swan", "-o", "{tmp}/out.txt"],
    "edit: --size 100": ["edit", "{clip}", "a swan", "--size", "100"],
    "invert: missing input": ["invert", "{missing}"],
    "eval: missing input": ["eval", "{missing}", "a swan"],
    "ablate: missing input": ["ablate", "{missing}", "a swan"],
    "batch: missing jobs file": ["batch", "{tmp}/no-jobs.yaml"],
    "demo: bad --model": ["demo", "--out", "{tmp}/demo", "--model", "./no/such/model"],
    "edit offline: default model": ["edit", "{clip}", "a swan", "-o", "{tmp}/out.mp4"],
    "eval offline: default CLIP": ["eval", "{clip}", "a swan", "-o", "{clip}"],
    "edit offline: missing captioner": ["edit", "{clip}", "a swan", "-o", "{tmp}/out.mp4", "--model", "tiny",
                                        "--captioner", "some/missing-id"],
}

#: The cases run with the hub offline and an empty hub cache (issue 26: the download named at once).
OFFLINE = {name for name in CASES if " offline:" in name}


def run_once(root: Path, argv: list[str], environ: dict[str, str] | None = None) -> dict:
    """One fresh `python -m cli ARGV` in ``root`` (in ``environ``, else this process's environment):
    wall seconds, exit code, last stderr line."""
    env = {**(os.environ if environ is None else environ), "PYTHONPATH": str(root)}  # that checkout's modules
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cli", *argv], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return {"wall_s": wall, "code": proc.returncode, "last_line": lines[-1] if lines else out.splitlines()[0]}


def _child_cpu() -> float:
    """User + system seconds of this process's finished children so far."""
    import resource

    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def measure(roots: dict[str, Path], argvs: dict[str, list[str]], repeats: int,
            envs: dict[str, dict[str, str]] | None = None) -> dict[str, dict]:
    """Per checkout, per case: median wall and CPU seconds over ``repeats`` fresh runs (interleaved);
    ``envs``: a case's own environment."""
    runs: dict[str, dict[str, list[dict]]] = {label: {name: [] for name in argvs} for label in roots}
    for _ in range(repeats):
        for name, argv in argvs.items():
            for label, root in roots.items():
                before = _child_cpu()
                row = run_once(root, argv, (envs or {}).get(name))
                row["cpu_s"] = _child_cpu() - before
                runs[label][name].append(row)
    return {label: {name: {"wall_s": round(statistics.median(r["wall_s"] for r in rows), 3),
                           "cpu_s": round(statistics.median(r["cpu_s"] for r in rows), 3),
                           "wall_s_min": round(min(r["wall_s"] for r in rows), 3),
                           "exit_code": rows[-1]["code"], "last_line": rows[-1]["last_line"]}
                    for name, rows in cases.items()}
            for label, cases in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", type=Path, help="another checkout of the project, timed the same way")
    ap.add_argument("--json", type=Path, help="write the results to this JSON file")
    ap.add_argument("--only", help="run only the cases whose name contains this (e.g. offline)")
    args = ap.parse_args()

    from p2v_fast.media.samples import make_sample_clip

    tmp = Path(tempfile.mkdtemp(prefix="p2v-startup-bench-"))
    fill = {"missing": tmp / "nope.mp4", "clip": make_sample_clip(tmp / "clip.mp4", n_frames=4), "tmp": tmp}
    argvs = {name: [a.format(**fill) for a in argv] for name, argv in CASES.items() if (args.only or "") in name}
    offline = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # no endpoint, no token
    envs = {name: {**offline, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf")} for name in OFFLINE}
    roots = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    load_before = os.getloadavg()
    results = measure(roots, argvs, args.repeats, envs)
    report = {
        "benchmark": "startup: fresh `python -m cli` refusing a bad command line, and --help",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_before": [round(x, 2) for x in load_before],
                    "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
        "offline_cases": sorted(OFFLINE & set(argvs)),  # HF_HUB_OFFLINE=1, an empty HF_HOME
        "repeats": args.repeats,
        "results": results,
    }
    for label, cases in results.items():
        print(f"{label}:")
        for name, row in cases.items():
            print(f"  {name:34s} wall {row['wall_s']:6.2f} s  cpu {row['cpu_s']:6.2f} s  exit {row['exit_code']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
