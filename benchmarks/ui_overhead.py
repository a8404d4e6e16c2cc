"""The UI's cost over the CLI's for the same tiny edit, and the UI process's idle memory.

    OMP_NUM_THREADS=1 python -m benchmarks.ui_overhead [--runs 3] [--size 128 --steps 10 --frames 8]

Each side runs the same edit (tiny model, one thread, the inversion cached after a warm-up run on
each side): the CLI as `p2v edit` in a fresh process each time (what a user waits for: start,
imports, model load, edit), and the UI as a `p2v ui` process already serving, through
gradio_client from submit to the final result (upload, queue, copy into the output folder, edit,
job record), the two alternating. Both also report the edit loop's own seconds (``seconds_edit``
of ``--json`` and of the page's numbers: no model load, no inversion). The UI process's RSS is
read after its models loaded (idle) and after the renders.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from cli import main; main()"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--frames", type=int, default=8)
    args = ap.parse_args()

    import psutil
    from gradio_client import Client, handle_file

    from p2v_fast.media.samples import make_sample_clip

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="p2v-ui-bench-"))
    clip = make_sample_clip(tmp / "clip.mp4", n_frames=16, size=(256, 192), fps=12.0)
    prompt, source = "a crochet swan on the lake", "a sample clip"
    opts = ["--model", "tiny", "--size", str(args.size), "--steps", str(args.steps), "--max-frames",
            str(args.frames), "--source-prompt", source, "--threads", "1"]

    port, log = _port(), tmp / "ui.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([*CLI, "ui", "--model", "tiny", "--port", str(port), "--out", str(tmp / "ui"),
                                 "--threads", "1"], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    cli_wall, cli_lib, ui_wall, ui_lib = [], [], [], []
    try:
        while not (m := re.search(r"^p2v ui: (http://\S+)", log.read_text(), re.M)):
            if proc.poll() is not None:
                sys.exit(f"p2v ui did not start: {log.read_text()}")
            time.sleep(0.2)
        time.sleep(2)
        idle_rss = psutil.Process(proc.pid).memory_info().rss
        client = Client(m.group(1), verbose=False, download_files=str(tmp / "downloads"))
        form = [handle_file(str(clip)), prompt, source, args.steps, args.size, "crop", args.frames, 7.5, "autograd",
                100.0, "wavefront", "torch", "(none)", 0]
        for i in range(args.runs + 1):  # alternating, so a change in the machine's load hits both; run 0 inverts
            t0 = time.perf_counter()
            subprocess.run([*CLI, "edit", str(clip), prompt, "-o", str(tmp / f"cli{i}.mp4"), "--json",
                            str(tmp / f"cli{i}.json"), *opts], cwd=ROOT, env=env, check=True, capture_output=True)
            t1 = time.perf_counter()
            status, *_, numbers, _files = client.predict(*form, api_name="/render")
            t2 = time.perf_counter()
            if not status.startswith("done: "):
                sys.exit(status)
            if i:
                cli_wall.append(t1 - t0)
                cli_lib.append(json.loads((tmp / f"cli{i}.json").read_text())["seconds_edit"])
                ui_wall.append(t2 - t1)
                ui_lib.append(numbers["seconds_edit"])
        after_rss = psutil.Process(proc.pid).memory_info().rss
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    med = statistics.median
    print(json.dumps({
        "edit": {"model": "tiny", "size": args.size, "steps": args.steps, "frames": args.frames, "threads": 1,
                 "runs": args.runs, "inversion": "cached"},
        "cli_wall_s": round(med(cli_wall), 3), "cli_edit_s": round(med(cli_lib), 3),
        "ui_wall_s": round(med(ui_wall), 3), "ui_edit_s": round(med(ui_lib), 3),
        "ui_over_cli_wall": round(med(ui_wall) / med(cli_wall), 3),
        "ui_over_cli_edit": round(med(ui_lib) / med(cli_lib), 3),
        "ui_wall_over_edit_s": round(med(ui_wall) - med(ui_lib), 3),  # upload, queue, copies, files, strip, ...
        "ui_idle_rss_mib": round(idle_rss / 2**20, 1), "ui_rss_after_renders_mib": round(after_rss / 2**20, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
