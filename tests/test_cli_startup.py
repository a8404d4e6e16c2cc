"""Issue 28 item 1: a command refuses what its options and the file system show wrong (a missing
or unreadable input, a bad extension, a bad --size or --model) before torch, diffusers and
transformers load, and --help never loads them. Each case runs in a fresh interpreter that has
imported none of them (several cases share one interpreter while none loads them; the timings
are benchmarks/startup.py's)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port, sample_clip

ROOT = Path(__file__).resolve().parents[1]
STACK = ("torch", "diffusers", "transformers")

# name -> argv ({missing}, {text}, {clip}, {empty}, {tmp} filled in); every one is refused
REFUSED = {
    "edit-missing": ["edit", "{missing}", "a swan"],
    "edit-not-a-video": ["edit", "{text}", "a swan"],
    "edit-empty-folder": ["edit", "{empty}", "a swan"],
    "edit-bad-output-extension": ["edit", "{clip}", "a swan", "-o", "{tmp}/out.txt"],
    "edit-bad-size": ["edit", "{missing}", "a swan", "--size", "100"],
    "edit-bad-model": ["edit", "{clip}", "a swan", "--model", "./no/such/model"],
    "invert-missing": ["invert", "{missing}"],
    "invert-bad-size": ["invert", "{clip}", "--size", "100"],
    "eval-missing": ["eval", "{missing}", "a swan"],
    "eval-no-edit": ["eval", "{clip}", "a swan"],
    "ablate-missing": ["ablate", "{missing}", "a swan"],
    "batch-missing": ["batch", "{tmp}/no-jobs.yaml"],
    "demo-bad-model-name": ["demo", "--out", "{tmp}/demo", "--model", "not a model"],
    "demo-bad-model-folder": ["demo", "--out", "{tmp}/demo", "--model", "./no/such/model"],
    "export-bad-model": ["export", "--model", "./no/such/model", "--engines", "{tmp}/engines"],
    "bench-bad-model": ["bench", "--model", "./no/such/model"],
    "edit-bad-max-memory": ["edit", "{clip}", "a swan", "-o", "{tmp}/out.mp4", "--max-memory", "12 apples"],
    "bench-bad-max-memory": ["bench", "--max-memory", "10k"],
    "demo-bad-size": ["demo", "--out", "{tmp}/demo", "--size", "100"],
    "edit-v-prediction-model": ["edit", "{clip}", "a swan", "-o", "{tmp}/out.mp4", "--model", "{vpred}"],
}
HELP = {
    "help": ["--help"],
    "edit-help": ["edit", "--help"],
    "ui-help": ["ui", "--help"],
}

# Runs the cases given as JSON on stdin, in order, in this fresh interpreter; stops after the first
# that loads the stack (the rest would find it loaded) and prints what it saw per case.
CHILD = """
import json, sys
from tests.helpers import p2v
STACK = {stack!r}
out = []
for name, argv in json.load(sys.stdin):
    r = p2v(*argv)
    loaded = [m for m in STACK if m in sys.modules]
    out.append({{"name": name, "code": r.exit_code, "stderr": r.stderr, "stdout": r.stdout, "loaded": loaded}})
    if loaded:
        break
print(json.dumps(out))
"""


def run_fresh(cases: dict[str, list[str]], env: dict[str, str] | None = None) -> dict[str, dict]:
    """Every case of ``cases`` run in an interpreter that had not loaded the stack before it."""
    todo, seen = list(cases.items()), {}
    while todo:
        proc = subprocess.run([sys.executable, "-c", CHILD.format(stack=STACK)], cwd=ROOT, input=json.dumps(todo),
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr
        for row in json.loads(proc.stdout):
            seen[row["name"]] = row
        todo = todo[len(json.loads(proc.stdout)):]
    return seen


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("startup")
    (tmp / "notes.mp4").write_text("not a video")
    (tmp / "empty").mkdir()
    (tmp / "vpred" / "scheduler").mkdir(parents=True)  # a 768 model's scheduler: refused from its config
    (tmp / "vpred" / "scheduler" / "scheduler_config.json").write_text('{"prediction_type": "v_prediction"}')
    subst = {"missing": tmp / "nope.mp4", "text": tmp / "notes.mp4", "empty": tmp / "empty",
             "clip": sample_clip(tmp, n_frames=2, audio=False), "tmp": tmp, "vpred": tmp / "vpred"}
    return run_fresh({name: [a.format(**subst) for a in argv] for name, argv in {**REFUSED, **HELP}.items()})


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_bad_input_is_refused_before_the_stack_loads(refusals, name) -> None:
    row = refusals[name]
    lines = [ln for ln in row["stderr"].splitlines() if ln.strip()]
    assert row["code"] not in (0, None), row
    assert len(lines) == 1 and lines[0].startswith("error:"), row["stderr"]
    assert row["loaded"] == [], f"{name} loaded {row['loaded']} before refusing: {lines}"


@pytest.mark.parametrize("name", list(HELP))
def test_help_loads_none_of_the_stack(refusals, name) -> None:
    row = refusals[name]
    assert row["code"] == 0 and "Usage" in row["stdout"], row
    assert row["loaded"] == [], f"{name} loaded {row['loaded']}"


# Issue 26: with the hub out of reach and an empty hub cache, a download a command needs is named
# (with its size when the catalog knows it) in one line before the stack loads. name -> (argv, what
# the line names); {folder} is a model folder with no captioner/ of its own.
UNREACHABLE = {
    "edit-default-model": (["edit", "{clip}", "a swan", "-o", "{tmp}/out.mp4"],
                           ("'stabilityai/stable-diffusion-2-depth' (Stable Diffusion 2 depth, 5.65 GB)",)),
    "invert-default-model": (["invert", "{clip}", "--source-prompt", "a lake"],
                             ("'stabilityai/stable-diffusion-2-depth' (Stable Diffusion 2 depth, 5.65 GB)",)),
    "eval-default-clip": (["eval", "{clip}", "a swan", "-o", "{clip}"],
                          ("CLIP model 'openai/clip-vit-large-patch14' (CLIP ViT-L/14, 1.71 GB)",)),
    "ablate-default-clip": (["ablate", "{clip}", "a swan", "--model", "tiny", "--out", "{tmp}/abl"],
                            ("CLIP model 'openai/clip-vit-large-patch14' (CLIP ViT-L/14, 1.71 GB)",)),
    "edit-missing-captioner": (["edit", "{clip}", "a swan", "-o", "{tmp}/out.mp4", "--model", "tiny",
                                "--captioner", "some/missing-id"], ("captioner 'some/missing-id'",)),
    "ui-default-model": (["ui", "--out", "{tmp}/ui"],
                         ("'stabilityai/stable-diffusion-2-depth' (Stable Diffusion 2 depth, 5.65 GB)",)),
    "export-default-model": (["export", "--engines", "{tmp}/engines"],
                             ("'stabilityai/stable-diffusion-2-depth' (Stable Diffusion 2 depth, 5.65 GB)",)),
    "edit-folder-default-captioner": (["edit", "{clip}", "a swan", "-o", "{tmp}/out.mp4", "--model", "{folder}"],
                                      ("captioner 'Salesforce/blip-image-captioning-base' (BLIP base captioner, "
                                       "990 MB)",)),
}


@pytest.fixture(scope="module", params=["offline", "closed-port"])
def unreachable(request, tmp_path_factory) -> tuple[str, dict[str, dict]]:
    """The UNREACHABLE cases run with HF_HUB_OFFLINE=1, or with the hub's endpoint a closed port on
    this machine (never the internet), in an empty hub cache."""
    tmp = tmp_path_factory.mktemp("hub")
    (tmp / "folder").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp / "hf"), P2V_CACHE=str(tmp / "cache"))
    if request.param == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    subst = {"clip": sample_clip(tmp, n_frames=2, audio=False), "tmp": tmp, "folder": tmp / "folder"}
    cases = {name: [a.format(**subst) for a in argv] for name, (argv, _) in UNREACHABLE.items()}
    return request.param, run_fresh(cases, env)


@pytest.mark.parametrize("name", list(UNREACHABLE))
def test_a_download_out_of_reach_is_named_before_the_stack_loads(unreachable, name) -> None:
    how, rows = unreachable
    if name.startswith("ui-") and importlib.util.find_spec("gradio") is None:
        pytest.skip("p2v ui needs Gradio (pip install 'p2v-fast[ui]')")
    row = rows[name]
    lines = [ln for ln in row["stderr"].splitlines() if ln.strip()]
    assert row["code"] not in (0, None), row
    assert len(lines) == 1 and lines[0].startswith("error:"), row["stderr"]
    for part in UNREACHABLE[name][1]:
        assert part in lines[0], lines[0]
    why = "offline mode (HF_HUB_OFFLINE) is on" if how == "offline" else "the hub cannot be reached"
    assert why in lines[0], lines[0]
    assert row["loaded"] == [], f"{name} loaded {row['loaded']} before refusing: {lines}"
