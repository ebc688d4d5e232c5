"""benchmarks/bench_methods.py runs end to end in --quick mode on one method and writes a sane result; its
statistics helper gives known answers. (Speed itself is measured by the benchmark, never asserted here.)"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_methods", REPO / "benchmarks" / "bench_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_mode_on_one_method_writes_json_and_markdown(bench, tmp_path):
    import torch

    threads = torch.get_num_threads()
    try:
        rc = bench.main(["--quick", "--methods", "simclr", "--backbones", "vit", "--reps", "2", "--out",
                         str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    result = json.loads((tmp_path / "methods_quick.json").read_text(encoding="utf-8"))
    assert result["threads"] == 1 and result["reps"] == 2 and result["batch"] == 8
    (row,) = result["rows"]
    assert (row["method"], row["backbone"], row["baseline"]) == ("simclr", "vit", "lightly")
    assert row["shape"]["views"] == [[3, 56, 56], [3, 56, 56]]  # both sides get the method's two views
    for clock in ("cpu", "wall"):
        r = row[clock]
        assert set(r["step_times_s"]) == {"dinoflow", "baseline"}
        assert all(len(v) == 2 and all(t > 0 for t in v) for v in r["step_times_s"].values())
        paired = [b / d for d, b in zip(r["step_times_s"]["dinoflow"], r["step_times_s"]["baseline"])]
        assert math.isclose(r["ratio"], sorted(paired)[0] / 2 + sorted(paired)[1] / 2, rel_tol=1e-9)
        assert r["ratio_ci95"][0] <= r["ratio"] <= r["ratio_ci95"][1]
        assert math.isclose(r["images_per_s"]["dinoflow"], 8 / r["median_step_s"]["dinoflow"], rel_tol=1e-9)
    md = (tmp_path / "methods_quick.md").read_text(encoding="utf-8")
    assert "--quick --methods simclr --backbones vit --reps 2" in md
    assert "| simclr | vit | 2x56 | lightly |" in md


def test_unknown_method_is_refused(bench, tmp_path):
    with pytest.raises(SystemExit, match="no baseline for nope"):
        bench.main(["--quick", "--methods", "nope", "--out", str(tmp_path)])


def test_bootstrap_interval_of_the_median(bench):
    assert bench.bootstrap_ci([1.5]) == (1.5, 1.5)
    lo, hi = bench.bootstrap_ci([1.0, 1.0, 1.0, 1.0])
    assert lo == hi == 1.0
    lo, hi = bench.bootstrap_ci([0.9, 1.0, 1.1, 1.2, 1.3])
    assert 0.9 <= lo <= 1.1 <= hi <= 1.3


def test_views_label_groups_consecutive_sizes(bench):
    assert bench.views_label([[3, 56, 56], [3, 56, 56], [3, 28, 28], [3, 28, 28], [3, 28, 28]]) == "2x56 + 3x28"
    assert bench.views_label([[3, 42, 42]] * 9) == "9x42"


def test_render_rewrites_the_table_from_the_json(bench, tmp_path):
    row = {"method": "simclr", "backbone": "vit", "baseline": "lightly", "baseline_parts": "NTXentLoss",
           "shape": {"views": [[3, 56, 56], [3, 56, 56]], "batch": 8},
           "cpu": {"median_step_s": {"dinoflow": 0.5, "baseline": 0.4}, "images_per_s": {"dinoflow": 16.0,
                   "baseline": 20.0}, "ratio": 0.81, "ratio_ci95": [0.7, 0.9]},
           "wall": {"ratio": 0.79}}
    result = {"command": "python benchmarks/bench_methods.py", "mode": "full", "batch": 8, "reps": 3, "warmup": 1,
              "sizes": {"global_crop_size": 56, "local_crop_size": 28, "n_local_crops": 4}, "threads": 1,
              "backbones": {"vit": {"arch": "a", "kwargs": {}}, "cnn": {"arch": "b", "kwargs": {}}},
              "load_average_at_end": "1.0", "rows": [row]}
    src = tmp_path / "methods.json"
    src.write_text(json.dumps(result), encoding="utf-8")
    assert bench.main(["--render", str(src)]) == 0
    md = (tmp_path / "methods.md").read_text(encoding="utf-8")
    # slower dinoflow is shown as such: ratio, interval and ratio of medians (16 / 20) all below 1
    assert "| simclr | vit | 2x56 | lightly | 0.500 | 0.400 | 16.0 | 20.0 | 0.81 | [0.70, 0.90] | 0.80 | 0.79 |" in md
    assert "re-rendered from `methods.json`" in md
