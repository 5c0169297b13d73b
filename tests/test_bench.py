import json

import bench


def test_quick_bench_runs_on_cpu_and_writes_its_json(tmp_path):
    bench.main(["--quick", "--workers", "1", "--json", str(tmp_path / "bench.json")])
    figures = json.loads((tmp_path / "bench.json").read_text())
    for key in ("input_raw_img_s", "input_cached_img_s", "train_img_s", "eval_img_s", "bare_train_img_s"):
        assert figures[key] > 0, key
    assert figures["device_type"] == "cpu" and "CPU" in figures["device"]
    assert figures["settings"]["quick"] and len(figures["configurations"]) == 2
    assert all(row["nih_epoch_s"] > 0 for row in figures["configurations"])
