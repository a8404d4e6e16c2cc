"""`p2v bench --protocol v2v120` (the peers' end-to-end yardstick), `p2v bench --plan` (the
wavefront simulated without weights) and `--threads` on every command that computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.protocol import PEERS, PROTOCOLS, ProtocolOptions
from p2v_fast.errors import InputError
from tests.helpers import p2v


def test_the_protocol_fixes_frames_size_and_steps() -> None:
    opts = ProtocolOptions()
    assert opts.workload == PROTOCOLS["v2v120"] == {"frames": 120, "size": 512, "steps": 50} and opts.faithful
    cfg = opts.edit_config("autograd")
    assert (cfg.max_frames, cfg.size, cfg.steps) == (120, 512, 50)
    small = ProtocolOptions(model="tiny", overrides={"frames": 3, "size": 64, "steps": 2})
    assert not small.faithful and small.workload == {"frames": 3, "size": 64, "steps": 2}
    assert ProtocolOptions(overrides={"steps": 50}).faithful  # restating the protocol's value changes nothing
    with pytest.raises(InputError, match="--protocol"):
        ProtocolOptions(name="v2v999")
    with pytest.raises(InputError, match="cannot override"):
        ProtocolOptions(overrides={"guidance": 3})
    assert {p["method"] for p in PEERS} >= {"TokenFlow", "Rerender-A-Video", "FlowVid", "StreamV2V"}


def test_protocol_runs_small_and_says_it_is_not_the_protocol(tiny_dir, tmp_path: Path) -> None:
    """The protocol's code path end to end on the tiny model, reduced through the explicit
    override (the real one needs a GPU): every stage timed, the JSON marked not faithful."""
    out = tmp_path / "v2v.json"
    r = p2v("bench", "--protocol", "v2v120", "--model", "tiny", "--frames", 3, "--size", 64, "--steps", 2,
             "--latent-update", "off", "--latent-update", "autograd", "--threads", 1, "--json", out)
    assert r.exit_code == 0, r.output
    assert "NOT THE PROTOCOL" in r.output and "TokenFlow" in r.output
    data = json.loads(out.read_text())
    assert data["protocol"] == "v2v120" and data["faithful"] is False
    assert data["overrides"] == {"frames": 3, "size": 64, "steps": 2} == data["workload"]
    assert [run["latent_update"] for run in data["runs"]] == ["off", "autograd"]
    for run in data["runs"]:
        assert run["frames"] == 3 and not run["inversion_cache_hit"]  # each mode from a cold cache
        assert {"setup", "encode + depth", "inversion", "edit"} <= set(run["stages"])
        assert all(v >= 0 for v in run["stages"].values())
        assert sum(run["stages"].values()) == pytest.approx(run["seconds"], rel=1e-6)
        assert set(run["overlapped_busy"]) == {"decode_busy", "encode_busy"}
        assert run["unet_calls"] > 0
    assert data["runs"][1]["unet_backward"] > 0 and data["runs"][0]["unet_backward"] == 0
    assert data["warmup_seconds"] > 0 and data["peers"] == PEERS
    assert data["setup_seconds"] >= data["warmup_seconds"] and data["compiled_buckets_warmed"] == 0
    from p2v_fast.nets import memory
    if memory.peaks_measurable(torch.device("cpu")):  # peaks over nested windows: the budget's do not reset them
        assert all(run["peak_memory_bytes"] > 0 for run in data["runs"])
        assert data["peak_memory_bytes"] >= max(run["peak_memory_bytes"] for run in data["runs"])


def test_every_compiled_bucket_is_warmed_up_before_the_clock() -> None:
    """The protocol warms up the buckets of calls of the default cap (16 frames: 32 samples) and
    of inversion calls (16 samples), not only the warm-up edit's 2 frames."""
    from types import SimpleNamespace

    from benchmarks.protocol import warm_up_compiled

    calls: list = []
    compiled = SimpleNamespace(compiled=True, warm_up=lambda hw, frames: calls.append((hw, frames)) or 5)
    assert warm_up_compiled(SimpleNamespace(backend=compiled, grad_backend=compiled), (64, 64)) == 5
    assert calls == [((64, 64), 16)]  # once per backend
    eager = SimpleNamespace(compiled=False, warm_up=lambda *a: calls.append(a) or 1)
    assert warm_up_compiled(SimpleNamespace(backend=eager, grad_backend=None), (64, 64)) == 0


def test_protocol_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    r = p2v("bench", "--protocol", "v2v999", "--model", "tiny")
    assert r.exit_code == 2 and "error:" in r.output and "--protocol" in r.output
    r = p2v("bench", "--protocol", "v2v120", "--model", "tiny", "--backend", "torch", "--backend", "onnxruntime")
    assert r.exit_code == 2 and "one backend" in r.output


def test_bench_plan_simulates_without_weights(tmp_path: Path) -> None:
    """`p2v bench --plan` alone is docs/performance.md's table. Before, it simulated the stages' 4
    frames, which every cap (4 to 50) holds whole: ten rows, two distinct."""
    from benchmarks.plan import CAPS

    out = tmp_path / "plan.json"
    r = p2v("bench", "--plan", "--json", out)
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert (data["frames"], data["steps"], data["size"], data["dtype"]) == (60, 50, 512, "float16")
    for mode in ("detached", "autograd"):
        rows = [p for p in data["plans"] if p["latent_update"] == mode]
        assert len({(p["ticks"], p["calls"], p["largest_call"]) for p in rows}) == len(CAPS) == len(rows)
    plans = {(p["latent_update"], p["cap"]): p for p in data["plans"]}
    assert plans[("detached", 16)]["ticks"] == 211 and plans[("autograd", 16)]["calls"] == 336
    assert "wavefront plan" in r.output
    r = p2v("bench", "--plan", "--model", "some/hub-model")
    assert r.exit_code == 2 and "--plan needs" in r.output


@pytest.mark.parametrize("command", [["edit", "{clip}", "a swan"], ["invert", "{clip}"], ["demo", "--out", "{tmp}"],
                                     ["eval", "{clip}", "--source", "{clip}", "--prompt", "x"],
                                     ["ablate", "{clip}", "a swan"]])
def test_threads_is_checked_on_every_command(tmp_path: Path, command) -> None:
    from tests.helpers import sample_clip

    clip = sample_clip(tmp_path, n_frames=2, audio=False)
    r = p2v(*[c.format(clip=clip, tmp=tmp_path / "demo") for c in command], "--threads", 0)
    assert r.exit_code == 2 and "--threads must be >= 1" in r.output
    assert not (tmp_path / "demo").exists()  # refused before any work
