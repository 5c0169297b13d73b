"""Localisation against NIH-format boxes: the box arithmetic, the file format, and the whole chain from a box in the
original film's pixels to the network's crop and back (with maps that are the boxes themselves)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import evaluate
from cxr14 import localisation
from cxr14.errors import DataError
from cxr14.films import eval_crop, fit_square
from dataset import FINDINGS

FILM_MASKS = localisation.film_masks  # as the module defines it, before any fixture replaces it


def test_iou_iobb_boxes_and_accuracy_on_known_geometry():
    iou, iobb = localisation.overlaps((0, 0, 10, 10), (5, 0, 10, 10))  # the right half
    assert iou == pytest.approx(0.5) and iobb == pytest.approx(1.0)  # inside the box: IoBB 1 whatever its size
    assert localisation.overlaps((0, 0, 10, 10), (20, 20, 30, 30)) == (0.0, 0.0)
    mask = np.zeros((40, 40), np.float32)
    mask[5:10, 5:15] = 1.0
    mask[30:35, 20:40] = 0.8
    mask[20:22, 0:2] = 0.2  # below the threshold: no box
    assert sorted(localisation.boxes_from_map(mask, 0.7)) == [(5, 5, 15, 10), (20, 30, 40, 35)]
    assert localisation.boxes_from_map(np.zeros((8, 8)), 0.7) == []
    assert localisation.peak(mask) == (10.0, 7.5)
    found = localisation.accuracy([((0, 0, 10, 10), [(0, 0, 10, 10)], (5, 5)), ((0, 0, 10, 10), [], (50, 50))])
    assert (
        found["boxes"] == 2 and found["iobb"]["0.9"] == 0.5 and found["iou"]["0.7"] == 0.5 and found["pointing"] == 0.5
    )


def test_nih_box_files_are_read_with_their_spelling_and_bad_ones_named(tmp_path):
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000001_000.png,Infiltrate,10.5,20,30,40,,,\n", encoding="utf-8"
    )
    table = localisation.read_boxes(path)
    assert table.finding.tolist() == ["Infiltration"] and table.loc[0, ["x", "y", "w", "h"]].tolist() == [
        10.5,
        20,
        30,
        40,
    ]
    path.write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000001_000.png,Fracture,1,2,3,4\n", encoding="utf-8"
    )
    with pytest.raises(DataError, match="BBox_List_2017.csv: unknown finding"):
        localisation.read_boxes(path)


@pytest.fixture(scope="module")
def perfect_report(trained_run, learn_dir, tmp_path_factory, monkeypatch_module):
    """evaluate.py's localisation with each map replaced by its true box carried through letterbox and crop."""
    boxes = localisation.read_boxes(learn_dir / "BBox_List_2017.csv")
    config = json.loads((trained_run / "config.json").read_text(encoding="utf-8"))
    prepare, names = localisation.prepare, {}

    def remembering(path, *args, **kwargs):
        film = prepare(path, *args, **kwargs)
        names[id(film)] = Path(path).name
        return film

    def box_mask(name, size, finding):
        box = boxes[boxes.image_name == name].set_index("finding").loc[finding]
        mask = np.zeros(size, np.uint8)
        mask[round(box.y) : round(box.y + box.h), round(box.x) : round(box.x + box.w)] = 255
        loaded = np.asarray(fit_square(Image.fromarray(mask), config["LOAD_SIZE"]))
        return eval_crop(loaded, config["IMAGE_SIZE"]).astype(np.float32) / 255

    def box_maps(model, films, wanted):
        return [
            [box_mask(names[id(film)], film.original.shape, FINDINGS[k]) for k in indices]
            for film, indices in zip(films, wanted)
        ]

    monkeypatch_module.setattr(localisation, "prepare", remembering)
    monkeypatch_module.setattr(localisation, "film_masks", box_maps)
    out = tmp_path_factory.mktemp("perfect")
    arguments = ["--checkpoint", str(trained_run / "best.pth"), "--bootstrap", "10", "--num_workers", "0"]
    return evaluate.evaluate(evaluate.parse_args([*arguments, "--out", str(out)])), out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_maps_that_are_the_boxes_are_found_at_every_threshold(perfect_report, trained_run, learn_dir):
    report, out = perfect_report
    split = pd.read_csv(trained_run / "split.csv")
    boxes = localisation.read_boxes(learn_dir / "BBox_List_2017.csv")
    boxes = boxes[boxes.image_name.isin(split.image_name[split.split == "test"])]
    results = report["localisation"]
    assert set(results) == set(boxes.finding) and len(results) == 8  # NIH's eight boxed findings
    for finding, result in results.items():
        assert result["boxes"] == (boxes.finding == finding).sum()
        assert result["iobb"]["0.5"] == 1.0 and result["pointing"] == 1.0, (finding, result)
        assert result["iou"]["0.3"] >= 0.9, (finding, result)  # 3-px nodules: a pixel of rounding halves an IoU
    table = pd.read_csv(out / "report.csv").set_index("finding")
    assert table.loc["Mass", "loc_iobb_0.1"] == 1.0 and table.loc["Mass", "wang_iobb_0.1"] == 0.4352
    assert np.isnan(table.loc["Hernia", "loc_boxes"])  # not a boxed finding
    assert (out / "localisation.png").stat().st_size > 10_000


@pytest.mark.slow  # Grad-CAM of every boxed test film: about 11 s on 2 cores
def test_the_real_maps_give_a_localisation_report(trained_run, tmp_path):
    arguments = ["--checkpoint", str(trained_run / "best.pth"), "--bootstrap", "10", "--num_workers", "0"]
    report = evaluate.evaluate(evaluate.parse_args([*arguments, "--out", str(tmp_path)]))
    assert set(report["localisation"]) == set(localisation.WANG_IOBB_01)
    for result in report["localisation"].values():
        assert 0 <= result["iobb"]["0.9"] <= result["iobb"]["0.1"] <= 1  # accuracy falls as T rises
    missing = evaluate.parse_args([*arguments, "--out", str(tmp_path), "--boxes", str(tmp_path / "none.csv")])
    with pytest.raises(DataError, match="box file not found"):
        evaluate.evaluate(missing)
    skipped = evaluate.evaluate(evaluate.parse_args([*arguments, "--out", str(tmp_path / "skip"), "--boxes", "none"]))
    assert "localisation" not in skipped


def test_maps_drawn_in_batches_equal_maps_drawn_one_film_at_a_time(trained_run, learn_dir, monkeypatch):
    from cxr14.inference import TorchModel

    monkeypatch.setattr(localisation, "film_masks", FILM_MASKS)  # the real one (perfect_report's fixture mocks it)

    model = TorchModel(trained_run / "best.pth", device="cpu")
    split = pd.read_csv(trained_run / "split.csv")
    boxes = localisation.read_boxes(learn_dir / "BBox_List_2017.csv")
    boxes = boxes[boxes.image_name.isin(split.image_name[split.split == "test"])]
    rows = pd.DataFrame({"image_name": boxes.image_name.unique()})
    rows["path"] = [str(next(learn_dir.rglob(name))) for name in rows.image_name]
    assert len(rows) > localisation.BATCH_FILMS // 4  # several films a batch
    monkeypatch.setattr(localisation, "BATCH_FILMS", 8)
    passes, forward = [], localisation.crop_outputs
    monkeypatch.setattr(localisation, "crop_outputs", lambda *args, **kw: passes.append(1) or forward(*args, **kw))
    batched = localisation.localise(model, boxes, rows)
    assert len(passes) == -(-len(rows) // 8)  # one forward pass per 8 films (it was one per film)
    monkeypatch.setattr(localisation, "BATCH_FILMS", 1)
    alone = localisation.localise(model, boxes, rows)
    assert batched[0] == alone[0] and batched[2:] == alone[2:] and batched[0]
    for ours, theirs in zip(batched[1], alone[1]):
        np.testing.assert_allclose(ours[2], theirs[2], atol=1e-5)  # the examples' masks


def test_swapped_zero_and_off_film_boxes_are_left_out_or_clipped_and_counted(tmp_path):
    """Swapped, negative, zero-area and off-film boxes passed unchecked: with every box swapped, every figure was
    0.000 (25.4)."""
    from cxr14.localisation import on_film, read_boxes

    rows = [
        ["00000001_000.png", "Mass", 100, 100, 50, 40],  # a good box
        ["00000002_000.png", "Mass", 150, 140, -50, -40],  # corners swapped: negative width and height
        ["00000003_000.png", "Nodule", 10, 10, 0, 30],  # zero width
    ]
    pd.DataFrame(rows, columns=["Image Index", "Finding Label", "x", "y", "w", "h"]).to_csv(
        tmp_path / "BBox_List_2017.csv", index=False
    )
    with pytest.warns(UserWarning, match=r"2 box\(es\) without a positive width .* 00000002_000.png x=150"):
        boxes = read_boxes(tmp_path / "BBox_List_2017.csv")
    assert list(boxes.image_name) == ["00000001_000.png"]
    assert on_film((10, 10, 60, 50), 1024, 1024) == (10, 10, 60, 50)  # inside: unchanged
    assert on_film((-4, 10, 96, 50), 1024, 1024) == (0, 10, 96, 50)  # 4% of its width off: clipped
    assert on_film((1000, 10, 1100, 50), 1024, 1024) is None  # three quarters off the film: left out
