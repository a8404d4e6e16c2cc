"""benchmarks.precision: each inversion precision against fp64 (x_T and reconstruction)."""

from __future__ import annotations

from benchmarks.precision import measure_precisions


def test_precisions_are_measured_against_fp64(tiny_models, one_torch_thread) -> None:
    out = measure_precisions(tiny_models, 4, (8, 8), ("fp32", "tf32", "fp16"))
    rows = out["precisions"]
    assert rows["fp64"]["x_T_dev"] == 0.0
    assert rows["fp32"]["x_T_dev"] < 1e-5 < rows["fp16"]["x_T_dev"] < 1e-1  # fp16: ~3e-4 at 50 steps
    assert abs(rows["fp32"]["reconstruction"] - rows["fp64"]["reconstruction"]) < 1e-5
    if tiny_models.device.type != "cuda":
        assert "skipped" in rows["tf32"]
