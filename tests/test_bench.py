import json

import pytest
import torch

import bench
from cxr14.timing import Variant


@pytest.mark.slow  # every section of bench.py, on the CPU: about 15 s on 2 cores
def test_quick_bench_runs_on_cpu_and_writes_its_json(tmp_path):
    bench.main(["--quick", "--workers", "1", "--json", str(tmp_path / "bench.json")])
    figures = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    keys = [
        "input_raw_img_s",
        "input_cached_img_s",
        "train_img_s",
        "eval_img_s",
        "bare_train_img_s",
        "cpu_train_img_s_fp32",
        "cpu_train_img_s_amp",
        "input_worker_ms_per_img",
        "input_worker_ms_per_img_device_aug",
        "device_aug_ms_per_img",
        "on_device_batches_per_s",
    ]
    for key in keys:
        assert figures[key] > 0, key
    assert figures["device_type"] == "cpu" and "CPU" in figures["device"]
    # fp32, channels_last (and bf16 with native bf16) unfolded, then train.py's own: folded
    assert figures["settings"]["quick"] and len(figures["configurations"]) in (3, 4)
    assert [row["fold"] for row in figures["configurations"]][-2:] == [False, True]
    assert all(row["ops_per_step"] > 0 for row in figures["configurations"])
    assert figures["loop_ops_per_step"] < figures["loop_ops_per_step_unfolded"]
    assert (
        figures["forward_ops_folded"] < figures["forward_ops_frozen_bn"] < figures["forward_ops_torchvision_frozen_bn"]
    )
    assert all(row["nih_epoch_s"] > 0 for row in figures["configurations"])


def test_on_cuda_the_rows_include_graphed_steps_beside_train_pys_default_eager_one():
    rows = bench.configurations(torch.device("cuda"), with_compile=True)
    folded = {(row.compile, row.graphs) for row in rows if row.fold}
    assert folded == {("", False), ("", True), ("default", False), ("reduce-overhead", False), ("default", True)}
    assert bench.train_py_variant(torch.device("cuda")) == Variant(amp=True, channels_last=True)
    assert Variant(amp=True, channels_last=True, graphs=True) in bench.configurations(torch.device("cuda"), False)
    assert not any(row.graphs for row in bench.configurations(torch.device("cpu"), with_compile=True))  # no graphs
