import csv
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxr14.errors import DataError
from cxr14.films import load_image
from cxr14.loaders import ChestXrayDataset, SeededSampler
from cxr14.pixels import FilmImages, index_images
from dataset import (
    FINDINGS,
    attach_image_paths,
    count_positives,
    make_split,
    pos_weight_from_counts,
    read_labels,
    read_split,
    save_split,
    split_by_patient,
)
from helpers import SAMPLE_CSV


def hand_counted_labels(path):
    """An independent reading of the CSV: csv module and str.split, no pandas."""
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))[1:]
    return {row[0]: set(row[1].split("|")) for row in rows}


def write_2017_form(path):
    """The original Data_Entry_2017.csv form: a trailing comma on the header and on every row."""
    lines = SAMPLE_CSV.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(line + "," for line in lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("form", ["2020", "2017"])
def test_reads_both_csv_forms_into_multi_hot_labels(tmp_path, form):
    path = SAMPLE_CSV if form == "2020" else write_2017_form(tmp_path / "Data_Entry_2017.csv")
    labels = read_labels(path)
    expected = hand_counted_labels(SAMPLE_CSV)
    assert len(labels) == 503 == len(expected)
    for _, row in labels.iterrows():
        positive = {finding for finding in FINDINGS if row[finding] == 1}
        assert positive == expected[row["image_name"]] - {"No Finding"}
    assert labels.loc[labels.image_name == "00000001_001.png", ["Cardiomegaly", "Emphysema"]].values.tolist() == [
        [1, 1]
    ]
    assert labels["Hernia"].sum() == 15
    assert labels["patient_id"].dtype == np.int64


def test_no_finding_rows_are_all_negative():
    labels = read_labels(SAMPLE_CSV)
    no_finding = [name for name, found in hand_counted_labels(SAMPLE_CSV).items() if found == {"No Finding"}]
    assert len(no_finding) > 100
    assert labels.set_index("image_name").loc[no_finding, list(FINDINGS)].to_numpy().sum() == 0


def test_unknown_label_names_row_image_and_label(tmp_path):
    lines = SAMPLE_CSV.read_text(encoding="utf-8").splitlines()
    lines[5] = lines[5].replace(lines[5].split(",")[1], "Effusion|Pneumonitis", 1)
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_labels(path)
    image = lines[5].split(",")[0]
    assert "row 6" in str(error.value) and image in str(error.value) and "'Pneumonitis'" in str(error.value)


@pytest.mark.parametrize("labels", ["No Finding|Effusion", "Cardiomegaly|No Finding|Edema", ""])
def test_no_finding_with_a_finding_and_an_empty_label_are_refused_by_row(labels, tmp_path):
    lines = SAMPLE_CSV.read_text(encoding="utf-8").splitlines()
    lines[7] = lines[7].replace(lines[7].split(",")[1], labels, 1)
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_labels(path)
    said = "mixes 'No Finding' with findings" if labels else "has no label"
    assert "row 8" in str(error.value) and lines[7].split(",")[0] in str(error.value) and said in str(error.value)


def test_missing_column_is_named(tmp_path):
    table = pd.read_csv(SAMPLE_CSV).drop(columns=["Patient ID"])
    table.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="Patient ID"):
        read_labels(tmp_path / "bad.csv")


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("fractions", [(0.7, 0.1, 0.2), (0.5, 0.25, 0.25), (0.9, 0.05, 0.05)])
def test_patient_split_never_shares_a_patient(seed, fractions):
    labels = read_labels(SAMPLE_CSV)
    part = split_by_patient(labels["patient_id"], fractions, seed)
    patients_per_part = [set(labels["patient_id"][part == k]) for k in range(3)]
    assert sum(len(p) for p in patients_per_part) == labels["patient_id"].nunique()  # disjoint and complete
    for k, fraction in enumerate(fractions):
        assert abs(len(patients_per_part[k]) - fraction * 120) <= 1
    assert (split_by_patient(labels["patient_id"], fractions, seed) == part).all()  # deterministic


def test_split_without_lists_is_70_10_20_by_patient(tmp_path):
    labels = read_labels(SAMPLE_CSV)
    split = make_split(labels, SAMPLE_CSV, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert set(split) == {"train", "val", "test"}
    assert labels.groupby("patient_id").apply(lambda rows: split[rows.index].nunique()).max() == 1
    assert split.map({"train": 1, "val": 0, "test": 0}).groupby(labels.patient_id).first().sum() == 84


def test_official_lists_give_the_test_split_and_val_is_carved_by_patient(tmp_path):
    csv_path = tmp_path / "Data_Entry_2017_v2020.csv"
    csv_path.write_text(SAMPLE_CSV.read_text(encoding="utf-8"), encoding="utf-8")
    labels = read_labels(csv_path)
    test_patients = sorted(labels.patient_id.unique())[::4]
    test_names = labels.image_name[labels.patient_id.isin(test_patients)]
    (tmp_path / "test_list.txt").write_text("\n".join(test_names), encoding="utf-8")
    (tmp_path / "train_val_list.txt").write_text(
        "\n".join(labels.image_name[~labels.image_name.isin(test_names)]), encoding="utf-8"
    )
    split = make_split(labels, csv_path, val_fraction=0.2, test_fraction=0.5, seed=3)
    assert set(labels.image_name[split == "test"]) == set(test_names)
    val_patients = set(labels.patient_id[split == "val"])
    assert val_patients and not val_patients & set(labels.patient_id[split == "train"])
    assert abs(len(val_patients) - 0.2 * (120 - len(test_patients))) <= 1

    save_split(labels, split, tmp_path / "split.csv")
    saved = read_split(tmp_path / "split.csv")
    assert saved["split"].tolist() == split.tolist() and saved["image_name"].tolist() == labels.image_name.tolist()


def test_official_lists_sharing_a_patient_are_refused(tmp_path):
    csv_path = tmp_path / "Data_Entry_2017.csv"
    csv_path.write_text(SAMPLE_CSV.read_text(encoding="utf-8"), encoding="utf-8")
    names = read_labels(csv_path).image_name
    (tmp_path / "test_list.txt").write_text(
        "00000001_000.png\n", encoding="utf-8"
    )  # patient 1 has other images in train_val
    (tmp_path / "train_val_list.txt").write_text("\n".join(names[1:]), encoding="utf-8")
    with pytest.raises(DataError, match="patient 1"):
        make_split(read_labels(csv_path), csv_path, 0.1, 0.2, 0)


def test_pos_weight_matches_hand_counts():
    labels = read_labels(SAMPLE_CSV)
    expected = hand_counted_labels(SAMPLE_CSV)
    positives, negatives = count_positives(labels[list(FINDINGS)])
    for finding, pos, neg, weight in zip(FINDINGS, positives, negatives, pos_weight_from_counts(positives, negatives)):
        hand = sum(finding in found for found in expected.values())
        assert (pos, neg) == (hand, 503 - hand)
        assert weight == pytest.approx((503 - hand) / hand)
    hernia = FINDINGS.index("Hernia")
    assert pos_weight_from_counts(positives, negatives, "sqrt")[hernia] == pytest.approx((488 / 15) ** 0.5)
    assert pos_weight_from_counts(positives, negatives, "ratio", cap=10)[hernia] == 10
    assert (pos_weight_from_counts(positives, negatives, "none") == 1).all()


def test_zero_positives_gives_a_warning_and_a_finite_weight():
    positives = np.array([5] * 13 + [0])
    with pytest.warns(UserWarning, match="Hernia"):
        weights = pos_weight_from_counts(positives, 100 - positives)
    assert np.isfinite(weights).all() and weights[-1] == 1.0 and weights[0] == 19.0


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)  # uint16 arrays become 16-bit PNGs, H x W x 4 arrays RGBA
    return path


def test_grayscale_rgba_and_16_bit_images_load_as_8_bit_gray(tmp_path):
    gray = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    assert (load_image(save(tmp_path / "gray.png", gray)) == gray).all()
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 7)])
    assert (load_image(save(tmp_path / "rgba.png", rgba)) == gray).all()  # alpha ignored, not blended
    deep = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    loaded = load_image(save(tmp_path / "deep.png", deep))
    assert loaded.dtype == np.uint8 and loaded.min() == 0 and loaded.max() == 255
    assert np.abs(loaded.astype(int) - gray).max() <= 1  # scaled over the full range, not clipped at 255


def test_a_16_bit_png_holding_12_bit_pixels_keeps_its_brightness(tmp_path):
    """A 12-bit detector's film saved as a 16-bit PNG (max 4080): scaled by 4095, not 65535 (which made the
    brightest pixel gray 16)."""
    gray = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    twelve_bit = gray.astype(np.uint16) * 16  # 0 ... 4080
    loaded = load_image(save(tmp_path / "twelve.png", twelve_bit))
    assert loaded.max() == 254 and np.abs(loaded.astype(int) - gray).max() <= 1
    eight_in_sixteen = load_image(save(tmp_path / "eight.png", gray.astype(np.uint16)))
    assert (eight_in_sixteen == gray).all()  # 8-bit values in a 16-bit file: as they are


def test_a_decompression_bomb_and_a_text_file_named_dcm_get_their_true_cause(tmp_path):
    from cxr14.films import open_film

    bomb = tmp_path / "bomb.png"
    Image.new("1", (15000, 15000)).save(bomb)  # 225 million pixels in a few kB
    with pytest.raises(DataError, match="bomb.png is not a chest film") as refused:
        open_film(bomb)
    assert "Re-extract" not in str(refused.value) and "Remove it" in str(refused.value)
    text = tmp_path / "IM0001.dcm"
    text.write_text("patient list, not a film", encoding="utf-8")
    with pytest.raises(DataError, match="IM0001.dcm is not a DICOM file") as refused:
        open_film(text)
    assert "force" not in str(refused.value)


def test_load_image_letterboxes_to_a_square(tmp_path):
    portrait = np.full((200, 100), 200, np.uint8)
    loaded = load_image(save(tmp_path / "portrait.png", portrait), size=64)
    assert loaded.shape == (64, 64)
    assert loaded[:, 32].min() == 200 and loaded[:, 0].max() == 0  # whole film kept, padded at the sides


def test_corrupt_image_error_names_the_file(tmp_path):
    bad = tmp_path / "00000001_000.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="00000001_000.png"):
        load_image(bad)
    dataset = ChestXrayDataset(FilmImages([bad], 32), np.zeros((1, 14)))
    with pytest.raises(DataError, match="00000001_000.png"):
        dataset[0]


def test_nested_nih_layout_is_indexed_and_missing_images_are_one_clear_error(tmp_path):
    labels = read_labels(SAMPLE_CSV).head(6)
    for k, name in enumerate(labels.image_name[:4]):
        save(tmp_path / f"images_00{k % 2 + 1}" / "images" / name, np.zeros((8, 8), np.uint8))
    assert set(index_images(tmp_path)) == set(labels.image_name[:4])
    with pytest.raises(DataError) as error:
        attach_image_paths(labels, tmp_path)
    assert "2 of 6" in str(error.value) and labels.image_name[4] in str(error.value)
    with pytest.warns(UserWarning, match="2 of 6"):
        kept = attach_image_paths(labels, tmp_path, drop_missing=True)
    assert kept.image_name.tolist() == labels.image_name[:4].tolist()
    assert all("images_00" in path for path in kept.path)


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links need extra rights on Windows")
def test_linked_image_folders_are_followed_and_a_link_cycle_ends(tmp_path):
    labels = read_labels(SAMPLE_CSV).head(4)
    elsewhere, data = tmp_path / "other_disk", tmp_path / "data"
    for name in labels.image_name:
        save(elsewhere / "images" / name, np.zeros((8, 8), np.uint8))
    data.mkdir()
    (data / "images_001").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(data, target_is_directory=True)  # data -> other_disk -> data -> ...
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no image is counted twice
        found = index_images(data)
    assert sorted(found) == sorted(labels.image_name)
    assert attach_image_paths(labels, data).path.str.contains("images_001").all()


def test_an_images_augmentation_changes_every_epoch_and_replays_within_one():
    from torch.utils.data import DistributedSampler

    from transforms import augmentation_params

    sampler = SeededSampler(DistributedSampler(range(50), 1, 0, seed=3), seed=3)  # as loaders.make_loaders builds it

    def parameters(epoch):
        sampler.set_epoch(epoch)
        seeds = dict(iter(sampler))  # image index -> its augmentation seed
        return augmentation_params(np.array([seeds[index] for index in range(50)]), 256)

    first, replayed, second = parameters(1), parameters(1), parameters(2)
    assert np.array_equal(first, replayed)  # a resumed epoch redraws what it drew
    assert (np.abs(first - second).max(axis=1) > 0).all()  # every image: another crop, angle and jitter


def test_dataset_items_and_seeded_augmentation(demo_dir):
    from functools import partial

    from cxr14.films import eval_crop
    from transforms import WorkerAugment

    labels = attach_image_paths(read_labels(demo_dir / "Data_Entry_2017_v2020.csv"), demo_dir)
    images, targets = FilmImages(labels.path, 48), labels[list(FINDINGS)]
    image, target = ChestXrayDataset(images, targets)[0]  # as loaded: augmented later, on the device
    assert image.shape == (1, 48, 48) and image.dtype == torch.uint8
    assert target.dtype == torch.float32 and target.tolist() == labels.loc[0, list(FINDINGS)].tolist()
    image, _, seed = ChestXrayDataset(images, targets)[(3, 42)]
    assert image.shape == (1, 48, 48) and seed == 42  # the seed travels with the image to the device
    view, _ = ChestXrayDataset(images, targets, partial(eval_crop, image_size=42))[0]
    assert view.shape == (1, 42, 42)
    augmented = ChestXrayDataset(images, targets, WorkerAugment(32))
    assert augmented[(3, 42)][0].shape == (1, 32, 32)
    assert torch.equal(augmented[(3, 42)][0], augmented[(3, 42)][0])  # same seed, same augmentation
    assert not torch.equal(augmented[(3, 42)][0], augmented[(3, 43)][0])
    state = torch.get_rng_state()
    augmented[(3, 42)]
    assert torch.equal(state, torch.get_rng_state())  # the caller's random stream (dropout) is left alone


def test_seeded_sampler_orders_by_epoch_and_skips():
    sampler = SeededSampler(torch.utils.data.DistributedSampler(range(20), 1, 0, seed=5), seed=5)
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) != first
    sampler.set_epoch(1, skip=8)
    assert list(sampler) == first[8:] and len(sampler) == 12
    assert sorted(index for index, _ in first) == list(range(20))


def test_demo_data_is_deterministic_and_in_nih_layout(tmp_path, demo_dir):
    from demo_data import write_demo

    write_demo(tmp_path / "again", patients=60, size=64, seed=1)
    write_demo(tmp_path / "other", patients=60, size=64, seed=9)
    for name in ("Data_Entry_2017_v2020.csv", "train_val_list.txt", "test_list.txt", "BBox_List_2017.csv"):
        assert (tmp_path / "again" / name).read_bytes() == (demo_dir / name).read_bytes()
    image = "images_001/images/00000002_000.png"
    assert (tmp_path / "again" / image).read_bytes() == (demo_dir / image).read_bytes()
    assert (tmp_path / "other" / image).read_bytes() != (demo_dir / image).read_bytes()
    labels = read_labels(demo_dir / "Data_Entry_2017_v2020.csv")  # parses as an NIH file
    assert len(attach_image_paths(labels, demo_dir)) == len(labels)
    split = make_split(labels, demo_dir / "Data_Entry_2017_v2020.csv", 0.1, 0.2, 0)  # official lists: disjoint
    assert set(labels.image_name[split == "test"]) == set(
        (demo_dir / "test_list.txt").read_text(encoding="utf-8").split()
    )


def test_demo_labels_keep_nih_order_and_co_occurrence_with_15_test_positives_each():
    """The default demo (600 patients): checked over five data seeds, from the label assignment alone."""
    import demo_data

    nih_order = np.argsort([-demo_data.NIH_POSITIVES[finding] for finding in FINDINGS])
    for seed in range(5):
        rng = np.random.default_rng(seed)
        follow_ups = np.minimum(1 + rng.geometric(0.4, 600), 8)
        patient_of_image = np.repeat(np.arange(600), follow_ups)
        in_test = np.isin(patient_of_image, rng.permutation(600)[:150])
        labels = demo_data.assign_labels(rng, patient_of_image, in_test)
        assert labels[in_test].sum(axis=0).min() >= 15, seed
        prevalence = labels.mean(axis=0)
        assert (np.diff(prevalence[nih_order]) <= 1e-9).all()  # Infiltration first ... Hernia last
        correlation = np.corrcoef(labels.T.astype(float))
        unrelated = correlation[FINDINGS.index("Hernia"), FINDINGS.index("Pneumothorax")]  # sickness alone
        pairs = [("Effusion", "Atelectasis"), ("Pneumonia", "Infiltration"), ("Mass", "Nodule"), ("Edema", "Effusion")]
        for first, second in pairs:  # companions on NIH co-occur more than findings that share only sickness
            assert correlation[FINDINGS.index(first), FINDINGS.index(second)] > unrelated + 0.05, (first, second)
        noisy = demo_data.add_label_noise(rng, labels)
        disagree = (noisy != labels).sum() / labels.sum()
        assert 0.5 * demo_data.LABEL_NOISE < disagree < 3 * demo_data.LABEL_NOISE


@pytest.mark.parametrize("finding", FINDINGS)
def test_every_demo_finding_changes_the_film_where_its_box_says(finding):
    """Drawn on the same phantom (same random stream) with and without the finding: the film changes, and for the
    findings NIH boxes, mostly inside the box."""
    from cxr14.phantom import Phantom

    anatomy = {"body_width": 0.85, "heart_radius": 0.21, "lung_height": 0.53, "exposure": 1.0}
    changes, inside = [], []
    for seed in range(4):
        plain, _ = Phantom(np.random.default_rng(seed), 128, anatomy, set()).draw()
        drawn, boxes = Phantom(np.random.default_rng(seed), 128, anatomy, {finding}).draw()
        difference = np.abs(drawn.astype(float) - plain.astype(float))
        changes.append(difference.sum() / 255)
        if finding in boxes:
            x, y, w, h = boxes[finding]
            box = difference[max(0, int(y)) : int(y + h) + 1, max(0, int(x)) : int(x + w) + 1]
            inside.append(box.sum() / max(difference.sum(), 1e-9))
    assert min(changes) > 5, changes  # in pixels of full-scale change; a 2-px nodule at half contrast gives 6
    if inside:
        assert min(inside) > 0.5, inside


def test_demo_boxes_are_nih_format_for_labelled_findings(demo_dir):
    labels = read_labels(demo_dir / "Data_Entry_2017_v2020.csv").set_index("image_name")
    boxes = pd.read_csv(demo_dir / "BBox_List_2017.csv", header=None, skiprows=1).iloc[:, :6]
    boxes.columns = ["image_name", "finding", "x", "y", "w", "h"]
    header = (demo_dir / "BBox_List_2017.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    nih_names = {
        "Atelectasis",
        "Cardiomegaly",
        "Effusion",
        "Infiltrate",
        "Mass",
        "Nodule",
        "Pneumonia",
        "Pneumothorax",
    }
    assert set(boxes.finding) == nih_names  # NIH spells Infiltration "Infiltrate" in this file
    for row in boxes.itertuples():
        assert labels.loc[row.image_name, "Infiltration" if row.finding == "Infiltrate" else row.finding] == 1
        assert 0 <= row.x and 0 <= row.y and row.x + row.w <= 64.5 and row.y + row.h <= 64.5 and row.w > 0


@pytest.mark.parametrize("content, said", [("", "is empty (0 bytes)"), ("header", "has its header but no rows")])
@pytest.mark.parametrize("command", ["train", "cache", "compute_pos_weight"])
def test_an_empty_or_header_only_label_file_is_one_line_from_every_command(command, content, said, tmp_path):
    import importlib

    csv_file = tmp_path / "Data_Entry_2017_v2020.csv"
    header = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Sex,View Position\n"
    csv_file.write_text(header if content == "header" else "", encoding="utf-8")
    argv = {
        "train": [f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'run'}", "--device=cpu", "--pretrained=none"],
        "cache": ["--data_dir", str(tmp_path), "--size", "32"],
        "compute_pos_weight": ["--csv", str(csv_file)],
    }[command]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw pandas or numpy warnings before the message
        with pytest.raises(SystemExit) as stopped:
            importlib.import_module(command).main(argv)
    assert str(stopped.value.code) == f"error: {csv_file} {said}: download NIH's Data_Entry_2017_v2020.csv again"
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache_32").exists()  # nothing written


def test_an_empty_or_latin_1_label_file_is_one_line_naming_the_file_and_the_line(tmp_path):
    from cxr14.errors import DataError
    from cxr14.expert_labels import read_expert_labels
    from cxr14.external import read_external
    from dataset import read_labels

    (tmp_path / "empty.csv").write_bytes(b"")
    rows = "Image Index,Finding Labels,Patient ID\n00000001_000.png,No Finding,1\n00000002_000.png,Hernia,2 caf\xe9\n"
    (tmp_path / "latin.csv").write_bytes(rows.encode("latin-1"))
    for read in (read_labels, read_expert_labels):
        with pytest.raises(DataError, match=r"empty.csv is empty \(0 bytes\)"):
            read(tmp_path / "empty.csv")
    with pytest.raises(DataError, match=r"latin.csv, line 3: not UTF-8 text"):
        read_labels(tmp_path / "latin.csv")
    chexpert = tmp_path / "CheXpert-v1.0-small"
    chexpert.mkdir()
    (chexpert / "valid.csv").write_bytes(b"")
    with pytest.raises(DataError, match=r"valid.csv is empty \(0 bytes\)"):
        read_external("chexpert", chexpert)
