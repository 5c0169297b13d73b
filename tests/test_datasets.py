"""Training on other datasets and their union (datasets.py): the 14 findings as 1, 0 or unlabelled, the loss and
pos_weight over labelled entries, splits by patient across datasets, official splits, and a hospital's own CSV."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train
from dataset import FINDINGS, count_positives
from datasets import TRAINING_DATASETS, read_training_films
from demo_data import write_chexpert_demo, write_demo
from errors import DataError
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
    loss = train.LabelledBCE(pos_weight=pos_weight)(logits, targets)
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
    assert train.LabelledBCE(pos_weight=pos_weight)(logits, full).item() == pytest.approx(plain.item(), rel=1e-12)


def test_pos_weight_counts_labelled_entries_only():
    targets = np.array([[1, 0], [np.nan, 1], [0, np.nan], [0, np.nan], [1, 0]])
    positives, negatives = count_positives(targets)
    assert positives.tolist() == [2, 1] and negatives.tolist() == [2, 2]


def test_train_py_offers_exactly_the_datasets_the_registry_reads():
    from configurator import rules

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
    nih_test = {"nih:" + name for name in (nih / "test_list.txt").read_text().split()}
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
        with pytest.raises(DataError, match="one folder per dataset"):
            read_training_films(data_settings(dataset, folders))


@pytest.mark.slow  # three runs from scratch: about 2 minutes on 2 cores
def test_a_union_run_learns_both_datasets_and_resumes_exactly(union_dirs, tmp_path):
    """Trained on the union, then the same run in two halves: the same weights; each dataset's validation films
    are ranked above chance by the model."""
    from films import eval_crop, load_image
    from helpers import assert_same_weights, weights
    from inference import TorchModel
    from metrics import auroc_per_finding, mean_auroc

    nih, chexpert = union_dirs
    settings = {"dataset": "nih,chexpert", "epochs": 4, "image_size": 48, "load_size": 56, "trainable_layers": "all"}
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert run(tiny(f"{nih},{chexpert}", straight, **settings)) == 0
    assert run(tiny(f"{nih},{chexpert}", halves, **{**settings, "epochs": 2})) == 0
    assert run(tiny(f"{nih},{chexpert}", halves, **settings, resume="last")) == 0
    assert_same_weights(weights(straight / "epoch_04.pth"), weights(halves / "epoch_04.pth"))
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
