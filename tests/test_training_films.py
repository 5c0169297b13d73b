"""Training on other datasets and their union (training_films.py): the 14 findings as 1, 0 or unlabelled, the loss and
pos_weight over labelled entries, splits by patient across datasets, official splits, and a hospital's own CSV."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train
from cxr14.errors import DataError, SettingsError
from cxr14.loop import LabelledBCE
from cxr14.training_films import TRAINING_DATASETS, read_training_films
from dataset import FINDINGS, count_positives
from demo_data import write_chexpert_demo, write_demo
from helpers import run
from helpers import tiny_settings as tiny


@pytest.fixture(scope="module")
def union_dirs(tmp_path_factory):
    """An NIH demo and a CheXpert-layout demo (other patients, another look), 64 px."""
    root = tmp_path_factory.mktemp("union")
    write_demo(root / "nih", patients=40, size=64, seed=11)
    write_chexpert_demo(root / "chexpert", patients=40, size=64, seed=12)
    return root / "nih", root / "chexpert"


def data_settings(dataset, data_dir, **changes):
    settings = train.parse_settings(tiny(data_dir, "unused", dataset=dataset, **changes))
    return settings.data


def test_the_loss_and_its_gradient_leave_unlabelled_entries_out():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(4, 3)), requires_grad=True)
    targets = torch.tensor([[1, 0, np.nan], [np.nan, 1, 0], [0, 0, 1], [1, np.nan, np.nan]])
    pos_weight = torch.tensor([2.0, 3.0, 0.5], dtype=torch.float64)
    loss = LabelledBCE(pos_weight=pos_weight)(logits, targets)
    loss.backward()
    labelled = ~torch.isnan(targets)
    alone = logits.detach().clone().requires_grad_(True)
    expected = F.binary_cross_entropy_with_logits(  # over the 8 labelled entries only, each with its finding's weight
        alone[labelled], targets[labelled], pos_weight=pos_weight.expand(4, 3)[labelled]
    )
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(logits.grad[labelled], alone.grad[labelled])
    assert torch.all(logits.grad[~labelled] == 0)
    full = torch.nan_to_num(targets)  # and without NaN it is BCEWithLogitsLoss's mean
    plain = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)(logits, full)
    assert LabelledBCE(pos_weight=pos_weight)(logits, full).item() == pytest.approx(plain.item(), rel=1e-12)


def test_pos_weight_counts_labelled_entries_only():
    targets = np.array([[1, 0], [np.nan, 1], [0, np.nan], [0, np.nan], [1, 0]])
    positives, negatives = count_positives(targets)
    assert positives.tolist() == [2, 1] and negatives.tolist() == [2, 2]


def test_train_py_offers_exactly_the_datasets_the_registry_reads():
    from cxr14.configurator import rules

    rule = rules(train)["DATASET"]
    for name in TRAINING_DATASETS:
        rule.validate("DATASET", name)
    assert rule.allowed.count(",") == len(TRAINING_DATASETS)  # no name the registry lacks ("..., csv, each once")
    rule.validate("DATASET", "nih,chexpert")
    for bad in ("nih,nih", "imagenet", ""):
        with pytest.raises(Exception, match="comma-separated"):
            rule.validate("DATASET", bad)


def test_a_union_keeps_frontal_films_splits_by_patient_across_datasets_and_maps_the_labels(union_dirs):
    nih, chexpert = union_dirs
    films = read_training_films(data_settings("nih,chexpert", f"{nih},{chexpert}"))
    rows, split = films.rows, films.split
    train_csv, valid_csv = (pd.read_csv(chexpert / f"{part}.csv") for part in ("train", "valid"))
    frontal = pd.concat([train_csv, valid_csv]).query("`Frontal/Lateral` == 'Frontal'")
    nih_rows = pd.read_csv(nih / "Data_Entry_2017_v2020.csv")
    assert (rows.dataset == "chexpert").sum() == len(frontal) and (rows.dataset == "nih").sum() == len(nih_rows)
    assert films.left_out["chexpert"]["laterals"] == len(train_csv) + len(valid_csv) - len(frontal) > 0
    # both demos number their patients from 1: patient 1 of each is another person, in whichever part
    assert {"nih:1", "chexpert:1"} <= set(rows.patient_id)
    assert split.groupby(rows.patient_id.to_numpy()).nunique().max() == 1
    # CheXpert's valid.csv is the test part; its train.csv gives train and val
    valid_names = {
        "chexpert:" + path.split("/", 1)[1] for path in valid_csv.Path[valid_csv["Frontal/Lateral"] == "Frontal"]
    }
    assert set(rows.image_name[split == "test"]) >= valid_names
    assert set(rows.image_name[(split == "test") & (rows.dataset == "chexpert")]) == valid_names
    assert {"train", "val"} <= set(split[rows.dataset == "chexpert"])
    # the labels: a CheXpert film has no Emphysema label; Lung Lesion 1 leaves Mass and Nodule unlabelled, blank is 0
    table = frontal.assign(image_name=["chexpert:" + path.split("/", 1)[1] for path in frontal.Path])
    mine = rows[rows.dataset == "chexpert"].set_index("image_name").loc[table.image_name]
    assert mine.Emphysema.isna().all() and mine.Hernia.isna().all()
    lesion = table["Lung Lesion"].to_numpy()
    assert np.isnan(mine.Mass.to_numpy()[lesion == 1]).all() and (mine.Nodule.to_numpy()[lesion == 0] == 0).all()
    assert (mine.Nodule.to_numpy()[np.isnan(lesion)] == 0).all()
    effusion = table["Pleural Effusion"].to_numpy()
    assert (effusion == -1).any() and np.isnan(mine.Effusion.to_numpy()[effusion == -1]).all()  # U-Ignore
    assert (mine.Effusion.to_numpy()[effusion == 1] == 1).all() and (
        mine.Effusion.to_numpy()[np.isnan(effusion)] == 0
    ).all()
    ones = read_training_films(data_settings("chexpert", str(chexpert), uncertain="ones")).rows
    assert (ones.set_index("image_name").loc[table.image_name].Effusion.to_numpy()[effusion == -1] == 1).all()
    # NIH's own rows keep their official test list and all 14 labels
    nih_test = {"nih:" + name for name in (nih / "test_list.txt").read_text(encoding="utf-8").split()}
    assert set(rows.image_name[(split == "test") & (rows.dataset == "nih")]) == nih_test
    assert rows[rows.dataset == "nih"][list(FINDINGS)].notna().all().all()


def test_mimic_films_keep_the_official_split(tmp_path):
    data = tmp_path / "mimic"
    metadata, labels, split = [], [], []
    for k in range(12):
        subject, study, dicom = 10000000 + k // 2, 50000000 + k, f"d{k:03d}"
        path = data / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16), 20 * k, np.uint8)).save(path)
        metadata.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": "PA"})
        labels.append({"subject_id": subject, "study_id": study, "Edema": float(k % 2), "Lung Lesion": np.nan})
        split.append(
            {
                "dicom_id": dicom,
                "study_id": study,
                "subject_id": subject,
                "split": ("train", "validate", "test")[(k // 2) % 3],
            }
        )
    pd.DataFrame(metadata).to_csv(data / "mimic-cxr-2.0.0-metadata.csv", index=False)
    table = pd.DataFrame(labels)
    for column in ("Atelectasis", "Cardiomegaly", "Consolidation", "Pneumonia", "Pneumothorax", "Pleural Effusion"):
        table[column] = 0.0
    table.to_csv(data / "mimic-cxr-2.0.0-chexpert.csv", index=False)
    pd.DataFrame(split).to_csv(data / "mimic-cxr-2.0.0-split.csv", index=False)
    films = read_training_films(data_settings("mimic", str(data)))
    expected = {
        "mimic:" + row["dicom_id"]: {"train": "train", "validate": "val", "test": "test"}[row["split"]] for row in split
    }
    got = dict(zip(films.rows.image_name.map(lambda name: "mimic:" + name.rsplit("/", 1)[1][:-4]), films.split))
    assert got == expected
    assert films.rows.patient_id.str.startswith("mimic:").all()


def own_csv(tmp_path, table):
    for name in table["path"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / name)
    table.to_csv(tmp_path / "my_films.csv", index=False)
    return tmp_path


def test_a_hospitals_own_csv_reads_its_findings_views_and_blanks(tmp_path):
    table = pd.DataFrame(
        {
            "path": [f"films/{k}.png" for k in range(6)],
            "patient_id": ["a", "a", "b", "c", "d", "e"],
            "Effusion": ["1", "0", "", "1", "-1", "0"],
            "view": ["PA", "AP", "PA", "LATERAL", "PA", "AP"],
            "sex": ["F", "M", "F", "M", "F", "M"],
            "age": ["50", "61", "", "70", "33", "41"],
        }
    )
    data = own_csv(tmp_path, table)
    films = read_training_films(
        data_settings("csv", str(data), csv="my_films.csv", val_fraction=0.2, test_fraction=0.2)
    )
    rows = films.rows.set_index("image_name")
    assert list(rows.index) == [
        "csv:films/0.png",
        "csv:films/1.png",
        "csv:films/2.png",
        "csv:films/4.png",
        "csv:films/5.png",
    ]
    assert films.left_out["csv"]["laterals"] == 1
    assert rows.Effusion.tolist()[:2] == [1.0, 0.0] and np.isnan(rows.Effusion.iloc[2])  # blank: unlabelled
    assert rows[[f for f in FINDINGS if f != "Effusion"]].isna().all().all()  # a finding without a column too
    assert rows.sex.tolist() == ["F", "M", "F", "F", "M"] and rows.view.tolist() == ["PA", "AP", "PA", "PA", "AP"]
    assert np.isnan(rows.Effusion["csv:films/4.png"])  # -1 under --uncertain ignore
    settings = data_settings(
        "csv", str(data), csv="my_films.csv", uncertain="ones", val_fraction=0.2, test_fraction=0.2
    )
    assert read_training_films(settings).rows.set_index("image_name").Effusion["csv:films/4.png"] == 1


@pytest.mark.parametrize(
    "change, said",
    [
        (lambda t: t.drop(columns="patient_id"), "missing column(s) ['patient_id']"),
        (lambda t: t.rename(columns={"Effusion": "Pleural Effusion"}), "column 'Pleural Effusion' is no finding"),
        (lambda t: t.assign(Effusion=["1", "0", "2"]), "row 4: Effusion is '2'"),
        (lambda t: t.assign(Effusion=["1", "yes", "0"]), "row 3: Effusion is 'yes'"),
        (lambda t: t.assign(path=["a.png", "../b.png", "c.png"]), "row 3: path '../b.png' points outside"),
    ],
)
def test_a_bad_own_csv_is_one_line_naming_the_file_the_column_and_the_row(change, said, tmp_path):
    table = pd.DataFrame(
        {"path": ["a.png", "b.png", "c.png"], "patient_id": ["1", "2", "3"], "Effusion": ["1", "0", ""]}
    )
    data = own_csv(tmp_path, table)
    change(table).to_csv(data / "my_films.csv", index=False)
    with pytest.raises(DataError, match="my_films.csv") as raised:
        read_training_films(data_settings("csv", str(data), csv="my_films.csv"))
    assert said in str(raised.value)


def test_one_folder_per_dataset_is_asked_for(union_dirs):
    nih, chexpert = union_dirs
    for dataset, folders in (("nih,chexpert", str(nih)), ("nih", f"{nih},{chexpert}")):
        mismatched = replace(data_settings("nih", str(nih)), dataset=dataset, data_dir=folders)  # train.py refuses
        with pytest.raises(SettingsError, match="one folder per dataset"):  # it first (exit 2: test_train.py)
            read_training_films(mismatched)


def test_vindr_trains_with_its_test_folder_as_the_test_part(tmp_path):
    """train.csv (three readers a film) gives train and val, test.csv (the consensus, without rad_id) the test part
    with its films in test/."""
    from helpers import write_dicom

    data, nan = tmp_path / "vindr", np.nan
    readings = {"train": [], "test": []}
    for k in range(40):
        finding = "Cardiomegaly" if k % 4 == 0 else "No finding"
        readings["train"] += [[f"t{k}", finding, f"R{reader}", nan, nan, nan, nan] for reader in (1, 2, 3)]
    readings["test"] = [["x1", "Cardiomegaly", 1, 2, 9, 9], ["x2", "No finding"] + [nan] * 4]
    readings["test"] += [["x3", "Pleural effusion", 3, 3, 8, 8]]
    corners = ["x_min", "y_min", "x_max", "y_max"]
    for part, rows in readings.items():
        (data / part).mkdir(parents=True)
        for image_id in {row[0] for row in rows}:
            write_dicom(data / part / f"{image_id}.dicom", np.full((16, 16), 1000))
        columns = ["image_id", "class_name", *(["rad_id"] if part == "train" else []), *corners]
        pd.DataFrame(rows, columns=columns).to_csv(data / f"{part}.csv", index=False)
    films = read_training_films(data_settings("vindr", str(data)))
    part = pd.Series(films.split.to_numpy(), index=films.rows.image_name)
    assert set(part.index[part == "test"]) == {f"vindr:test/x{k}.dicom" for k in (1, 2, 3)}
    assert set(part[part.index.str.startswith("vindr:train/")]) == {"train", "val"}
    labels = films.rows.set_index("image_name")
    assert (
        labels.loc["vindr:test/x1.dicom", "Cardiomegaly"] == 1
        and labels.loc["vindr:test/x2.dicom", list(FINDINGS)].max() == 0
    )
    assert (
        labels.loc["vindr:test/x3.dicom", "Effusion"] == 1 and labels.loc["vindr:train/t4.dicom", "Cardiomegaly"] == 1
    )
    assert labels.Emphysema.isna().all()  # VinDr has no Emphysema class: unlabelled


def test_dataset_weights_give_each_dataset_its_share_of_an_epoch():
    """1,1 over 90 and 10 films: 50 draws each; the small dataset's films five times each, with other augmentation
    seeds each time; the order a function of (seed, epoch), split between processes without loss."""
    from cxr14.loaders import SeededSampler, SharesSampler

    groups = [np.arange(90), np.arange(90, 100)]
    sampler = SeededSampler(SharesSampler(groups, [1, 1], seed=3), 3)
    sampler.set_epoch(1)
    items = list(sampler)
    indices = np.array([index for index, _ in items])
    assert len(items) == 100 == len(sampler)
    assert (indices < 90).sum() == 50 and len(set(indices[indices < 90])) == 50
    assert np.bincount(indices[indices >= 90] - 90, minlength=10).tolist() == [5] * 10
    assert len({seed for index, seed in items if index == 95}) == 5
    assert list(sampler) == items
    sampler.set_epoch(2)
    assert list(sampler) != items
    whole = SharesSampler(groups, [1, 1], seed=3)
    halves = [SharesSampler(groups, [1, 1], seed=3, world_size=2, rank=rank) for rank in (0, 1)]
    for each in (whole, *halves):
        each.set_epoch(1)
    assert sorted(list(halves[0]) + list(halves[1])) == sorted(whole) and len(halves[0]) == 50
    assert SharesSampler([np.arange(60), np.arange(60, 101)], [1, 2], seed=0).quotas.tolist() == [34, 67]


def test_dataset_weights_are_one_per_dataset(union_dirs):
    from cxr14.configurator import rules
    from cxr14.training_films import dataset_weights

    nih, chexpert = union_dirs
    union = data_settings("nih,chexpert", f"{nih},{chexpert}")
    with pytest.raises(SettingsError, match="one per dataset"):
        dataset_weights(replace(union, dataset_weights="1,2,3"))
    assert dataset_weights(data_settings("nih,chexpert", f"{nih},{chexpert}", dataset_weights="1,2")) == [1, 2]
    from cxr14.loaders import epoch_order

    weighted = data_settings("nih,chexpert", f"{nih},{chexpert}", dataset_weights="1,1")
    with pytest.raises(DataError, match="gives chexpert a share, but it has no training film"):
        epoch_order(weighted, pd.DataFrame({"dataset": ["nih"] * 5}), 1, 0)
    for bad in ("0,1", "1,x", "-1"):
        with pytest.raises(Exception, match="numbers above 0"):
            rules(train)["DATASET_WEIGHTS"].validate("DATASET_WEIGHTS", bad)


def test_each_dataset_of_a_union_reads_its_own_cache_keyed_by_its_own_paths(union_dirs, tmp_path):
    """cache.py --dataset chexpert keys its films by their path below the folder; a union's images come from that
    cache for CheXpert and from the files for NIH (no cache), the same pixels either way, in the run's order."""
    import shutil

    from cache import build_cache
    from cxr14.films import load_image
    from cxr14.pixels import CachedImages, FilmImages, MixedImages, dataset_images, images_on_device
    from cxr14.training_films import image_groups

    nih, chexpert = (shutil.copytree(folder, tmp_path / folder.name) for folder in union_dirs)
    folder = build_cache(chexpert, 40, workers=1, dataset="chexpert")
    keys = pd.read_csv(folder / "index.csv").image_name
    assert keys.str.match(r"^(train|valid)/patient\d+/study\d+/view\d_frontal\.jpg$").all()
    data = data_settings("nih,chexpert", f"{nih},{chexpert}", load_size=40)
    rows = read_training_films(data).rows
    images = dataset_images(image_groups(rows, data), 40, strict=True)
    assert [type(source) for source in images.sources] == [FilmImages, CachedImages]
    for position in (0, len(rows) // 3, len(rows) - 1, *np.flatnonzero(rows.dataset == "chexpert")[:3]):
        assert np.array_equal(images[position], load_image(rows.path[position], 40))
    cached = [CachedImages(folder, keys[:6]), CachedImages(folder, keys[6:10])]
    mixed = MixedImages(cached, [1, 0, 0, 1, 0], [0, 0, 1, 1, 2])
    expected = np.stack([cached[1][0], cached[0][0], cached[0][1], cached[1][1], cached[0][2]])
    assert np.array_equal(images_on_device(mixed, torch.device("cpu")).numpy(), expected)


def test_the_summary_and_metrics_rows_carry_each_datasets_validation_auroc(tmp_path):
    from cxr14.run_folder import EpochMetrics, summary

    metrics = EpochMetrics(1, 0.5, 0.4, 0.7, 1e-3, 3.0, {"Hernia": 0.9}, {"nih": 0.75, "chexpert": 0.625})
    row = metrics.row()
    assert row["val_auroc_nih"] == 0.75 and row["val_auroc_chexpert"] == 0.625 and row["auroc_Hernia"] == 0.9
    assert EpochMetrics.from_row(row) == metrics
    table = summary([row], tmp_path).splitlines()
    assert table[0].split()[-4:] == ["nih", "AUROC", "chexpert", "AUROC"]
    assert table[1].split()[-4:] == ["0.7500", "0.6250", "<-", "best"]


@pytest.mark.slow  # three runs from scratch and an evaluation: about 3 minutes on 2 cores
def test_a_union_run_learns_both_datasets_resumes_exactly_and_is_evaluated_per_dataset(union_dirs, tmp_path):
    """Trained on the union from each dataset's cache, in equal shares, then the same run in two halves: the same
    weights; each dataset's validation films are ranked above chance by the model; evaluate.py reports the run's
    test split pooled and per dataset, each section the AUROC of that dataset's films in predictions.csv."""
    import json
    import shutil

    from sklearn.metrics import roc_auc_score

    import evaluate
    from cache import build_cache
    from cxr14.films import eval_crop, load_image
    from cxr14.inference import TorchModel
    from cxr14.metrics import auroc_per_finding, mean_auroc
    from helpers import assert_same_weights, weights

    nih, chexpert = (shutil.copytree(folder, tmp_path / folder.name) for folder in union_dirs)
    build_cache(nih, 56, workers=1)
    build_cache(chexpert, 56, workers=1, dataset="chexpert")
    settings = {"dataset": "nih,chexpert", "epochs": 4, "image_size": 48, "load_size": 56, "trainable_layers": "all"}
    settings["dataset_weights"] = "1,1"
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert run(tiny(f"{nih},{chexpert}", straight, **settings)) == 0
    assert run(tiny(f"{nih},{chexpert}", halves, **{**settings, "epochs": 2})) == 0
    assert run(tiny(f"{nih},{chexpert}", halves, **settings, resume="last")) == 0
    assert_same_weights(weights(straight / "epoch_04.pth"), weights(halves / "epoch_04.pth"))
    metrics = pd.read_csv(straight / "metrics.csv")
    assert metrics[["val_auroc_nih", "val_auroc_chexpert"]].notna().all().all()
    split = pd.read_csv(straight / "split.csv").set_index("image_name").split
    assert split.index.str.startswith(("nih:", "chexpert:")).all()
    model = TorchModel(straight / "best.pth", device="cpu")
    rows = read_training_films(model.data).rows
    rows = rows[rows.image_name.map(split) == "val"]
    crops = np.stack([eval_crop(load_image(path, model.load_size), model.image_size) for path in rows.path])
    probabilities = model.predict(crops).raw
    for name in ("nih", "chexpert"):
        mine = (rows.dataset == name).to_numpy()
        score = mean_auroc(auroc_per_finding(rows[list(FINDINGS)].to_numpy()[mine], probabilities[mine]))
        print(name, score)
        assert score > 0.6, (name, score)
    out = tmp_path / "report"
    evaluate.main(
        ["--checkpoint", str(straight / "best.pth"), "--out", str(out), "--bootstrap", "20", "--device", "cpu"]
    )
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    predictions = pd.read_csv(out / "predictions.csv")
    assert set(predictions.image_name) == set(split.index[split == "test"]) and report["dataset"] == "nih,chexpert"
    assert report["pooled"]["mean_auroc"] == report["mean_auroc"]
    for name in ("nih", "chexpert"):
        section, mine = report["datasets"][name], predictions[predictions.image_name.str.startswith(f"{name}:")]
        assert section["images"] == len(mine)
        for finding in section["findings"]:
            labelled = mine[f"label_{finding['finding']}"].notna()
            labels, scores = mine[f"label_{finding['finding']}"][labelled], mine[f"prob_{finding['finding']}"][labelled]
            if labels.nunique() == 2:
                assert finding["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
            else:
                assert finding["auroc"] is None  # NaN in JSON: no AUROC without both classes


def test_an_own_csv_without_a_labelled_finding_is_refused_before_training(tmp_path):
    from helpers import run, tiny_settings

    table = pd.DataFrame(
        {"path": [f"films/{k}.png" for k in range(20)], "patient_id": [str(k) for k in range(20)], "Effusion": ""}
    )
    data = own_csv(tmp_path / "data", table)
    message = run(tiny_settings(data, tmp_path / "run", dataset="csv", csv="my_films.csv", batch_size=4))
    assert "no film of the training split has a labelled finding" in message and "my_films.csv" in message, message
    assert not (tmp_path / "run" / "best.pth").exists()


def test_evaluating_a_dataset_the_run_trained_on_leaves_its_training_and_validation_films_out(union_dirs, tmp_path):
    """A run on CheXpert's train.csv (train and val) evaluated on train.csv and valid.csv together: only valid.csv's
    frontal films, the run's test part, are scored; train.csv alone is refused."""
    import evaluate
    from helpers import run, tiny_settings

    _, chexpert = union_dirs
    assert run(tiny_settings(chexpert, tmp_path / "run", dataset="chexpert", epochs=1, batch_size=8)) == 0
    train_csv, valid_csv = (pd.read_csv(chexpert / f"{part}.csv") for part in ("train", "valid"))
    pd.concat([train_csv, valid_csv]).to_csv(tmp_path / "both.csv", index=False)  # the shared folder stays as it is
    frontal = valid_csv[valid_csv["Frontal/Lateral"] == "Frontal"]
    arguments = ["--checkpoint", str(tmp_path / "run" / "best.pth"), "--dataset", "chexpert"]
    arguments += ["--data_dir", str(chexpert), "--bootstrap", "10", "--num_workers", "0", "--boxes", "none"]
    both = ["--csv", str(tmp_path / "both.csv"), "--out", str(tmp_path / "e")]
    report = evaluate.evaluate(evaluate.parse_args([*arguments, *both]))
    assert report["images"] == len(frontal), (report["images"], len(frontal))
    trained_frontal = (train_csv["Frontal/Lateral"] == "Frontal").sum()
    assert (
        report["left_out"]["films of the run's training or validation split, or of their patients"] == trained_frontal
    )
    with pytest.raises(DataError, match="is among the films of the run's training or validation split"):
        evaluate.evaluate(evaluate.parse_args([*arguments, "--csv", "train.csv", "--out", str(tmp_path / "t")]))


def test_a_hospitals_own_csv_joins_a_union_and_csv_names_its_file(union_dirs, tmp_path, capsys):
    nih, chexpert = union_dirs
    table = pd.DataFrame(
        {"path": [f"films/{k}.png" for k in range(10)], "patient_id": list("aabbccddee"), "Effusion": ["1", "0"] * 5}
    )
    data = own_csv(tmp_path / "own", table)
    films = read_training_films(data_settings("nih,csv", f"{nih},{data}", csv="my_films.csv"))
    nih_rows = len(pd.read_csv(nih / "Data_Entry_2017_v2020.csv"))
    assert films.rows.dataset.value_counts().to_dict() == {"nih": nih_rows, "csv": len(table)}
    assert [path.name for path in films.sources] == ["Data_Entry_2017_v2020.csv", "my_films.csv"]
    own = films.rows[films.rows.dataset == "csv"]
    assert own.Effusion.tolist() == table.Effusion.astype(float).tolist()
    with pytest.raises(SystemExit, match="2"):  # refused as the settings are read
        data_settings("nih,chexpert", f"{nih},{chexpert}", csv="my_films.csv")
    assert "CSV names a hospital's own file, for a union with csv" in capsys.readouterr().err


@pytest.mark.slow  # a run and two evaluations: about 11 s on 2 cores
def test_a_run_on_another_dataset_with_films_gone_is_evaluated_on_those_left_with_the_flag(union_dirs, tmp_path):
    import shutil

    import evaluate
    from helpers import run, tiny_settings

    chexpert = shutil.copytree(union_dirs[1], tmp_path / "chexpert")
    assert run(tiny_settings(chexpert, tmp_path / "run", dataset="chexpert", epochs=1, batch_size=8)) == 0
    split = pd.read_csv(tmp_path / "run" / "split.csv")
    test = split.image_name[split.split == "test"].str.removeprefix("chexpert:")
    gone = sorted(test)[:3]
    for name in gone:
        (chexpert / name).unlink()
    arguments = ["--checkpoint", str(tmp_path / "run" / "best.pth"), "--bootstrap", "10", "--num_workers", "0"]
    arguments += ["--boxes", "none", "--out", str(tmp_path / "report")]
    with pytest.raises(DataError, match="--drop_missing_images"):
        evaluate.evaluate(evaluate.parse_args(arguments))
    report = evaluate.evaluate(evaluate.parse_args([*arguments, "--drop_missing_images"]))
    assert report["images"] == len(test) - len(gone)
    assert report["skipped"]["missing"] == [f"chexpert:{name}" for name in gone]


def test_a_union_member_without_training_films_has_a_share_of_none_not_nan(union_dirs):
    from cxr14.training_films import sampling

    nih, chexpert = union_dirs
    data = data_settings("nih,chexpert", f"{nih},{chexpert}")
    films = read_training_films(data)
    split = films.split.where(films.rows.dataset.to_numpy() != "chexpert", "test")  # chexpert: test films only
    said = sampling(data, films.rows, split)
    assert "nih 100%, chexpert 0% (no training film" in said and "nan" not in said
