"""bench/gpu.py runs on the CPU at toy size (CI never has a GPU): the same code paths as on the device."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


@pytest.mark.slow
def test_gpu_bench_toy_run_writes_json_and_checks_pass(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(bench)
    results = bench.main(["--toy", "--out", str(tmp_path / "gpu.json")])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["rows"].keys() == results["rows"].keys()
    assert results["checks"]["unet_rel_err_vs_fp64"] < 1e-5          # fp32 CPU vs fp64 CPU
    assert results["checks"]["sampler_max_abs_diff_vs_cpu"] == 0.0    # the same device: identical
    for name, row in results["rows"].items():
        value = row.get("img_per_s", row.get("seconds"))
        assert value is not None and math.isfinite(value) and value > 0, name
    assert "train fp32 eager" in capsys.readouterr().out
