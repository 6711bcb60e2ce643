"""bench/gpu.py runs on the CPU at toy size (CI never has a GPU): the same code paths as on the device."""

import json
import math

import pytest


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")  # toy tensors: OpenMP spin-waits on a loaded 2-core machine
def test_gpu_bench_toy_run_writes_json_and_checks_pass(tmp_path, capsys, load_bench):
    bench = load_bench("gpu")
    results = bench.main(["--toy", "--out", str(tmp_path / "gpu.json")])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["rows"].keys() == results["rows"].keys()
    assert results["layouts"] == ["srdiff", "daclip"]  # both UNet layouts, each with its own rows
    for layout in results["layouts"]:
        checks = results["checks"][layout]
        assert checks["unet_rel_err_vs_fp64"] < 1e-5          # fp32 CPU vs fp64 CPU
        assert checks["sampler_max_abs_diff_vs_cpu"] == 0.0    # the same device: identical
        assert any(name.startswith(f"{layout}: train fp32") for name in results["rows"])
        assert results["parameters"][layout] > 0
    for name, row in results["rows"].items():
        value = row.get("img_per_s", row.get("seconds"))
        assert value is not None and math.isfinite(value) and value > 0, name
        # Model FLOPs per image and the rate achieved: utilisation, not only speed.
        assert row["gflop_per_img"] > 0 and math.isfinite(row["tflop_per_s"]) and row["tflop_per_s"] > 0, name
    out = capsys.readouterr().out
    assert "srdiff: train fp32 eager" in out and "daclip: train fp32 eager" in out and "TFLOP/s" in out


def test_flop_count_per_image_is_the_layouts_model_flops(load_bench):
    """FLOPs are counted on the meta device (free) per image; backward adds about twice the forward."""
    bench = load_bench("gpu")
    for layout in bench.LAYOUTS:
        one = bench.model_flops(bench.TOY, layout, 1, (32, 48), backward=False)
        two = bench.model_flops(bench.TOY, layout, 2, (32, 48), backward=False)
        train = bench.model_flops(bench.TOY, layout, 2, (32, 48), backward=True)
        assert one > 0 and two == one                     # per image, whatever the batch
        assert 2.5 * one < train < 3.5 * one              # forward + backward ~ 3x forward
    row = bench.with_flops({"seconds": 2.0}, 4e12, 0.5)
    assert row["gflop_per_img"] == 4000.0 and row["tflop_per_s"] == 2.0
