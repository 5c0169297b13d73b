"""RSNA Pneumonia's films are NIH's films (nih_copies.py): an RSNA-layout set whose films are the demo's NIH films,
some of the trained run's test patients and some of its training patients, with a mapping file the test writes in
RSNA's JSON or NIH's CSV form. The films of patients the run saw are left out of RSNA's score, a union keeps each NIH
patient in one part, and without the mapping the report says its score is not an external one."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import evaluate
from cxr14.errors import DataError
from cxr14.nih_copies import NIH_COPIES, NOT_EXTERNAL, nih_patient, read_rsna_mapping
from cxr14.training_films import NOT_KEPT_APART, read_training_films
from dataset import read_labels
from helpers import tiny_settings, write_dicom

TEST_FILMS, TRAIN_FILMS = 24, 16  # RSNA copies of the run's test films, and of its training films


def write_rsna_copies(folder, learn_dir, image_names, mapping="json"):
    """RSNA's layout of these NIH films (challenge ids of RSNA's form, Target from NIH's Pneumonia label) and, unless
    mapping is None, the mapping from each challenge id to its NIH film."""
    labels = read_labels(learn_dir / "Data_Entry_2017_v2020.csv").set_index("image_name")
    paths = {path.name: path for path in learn_dir.rglob("*.png")}
    (folder / "stage_2_train_images").mkdir(parents=True)
    rows, records = [], []
    for k, name in enumerate(image_names):
        film = f"{k:08x}-0000-4000-8000-{k:012x}"
        pixels = np.asarray(Image.open(paths[name])).astype(np.uint16) * 16
        write_dicom(folder / "stage_2_train_images" / f"{film}.dcm", pixels)
        rows.append([film, np.nan, np.nan, np.nan, np.nan, int(labels.Pneumonia[name])])
        records.append({"subset_img_id": film, "img_id": name, "orig_labels": ["No Finding"]})
    table = pd.DataFrame(rows, columns=["patientId", "x", "y", "width", "height", "Target"])
    table.to_csv(folder / "stage_2_train_labels.csv", index=False)
    if mapping == "json":
        (folder / "pneumonia-challenge-dataset-mappings_2018.json").write_text(json.dumps(records), encoding="utf-8")
    elif mapping == "csv":
        pd.DataFrame(records).drop(columns="orig_labels").to_csv(folder / "pneumonia_dataset_mapping.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def chosen(trained_run):
    """Test films of the run and training films of the run, with the run's own record of their patients."""
    split = pd.read_csv(trained_run / "split.csv", dtype={"image_name": str})
    test = split[split.split == "test"].iloc[:TEST_FILMS]
    train = split[split.split == "train"].iloc[:TRAIN_FILMS]
    return pd.concat([test, train], ignore_index=True), split


def evaluate_rsna(trained_run, data, out, *extra):
    arguments = ["--checkpoint", str(trained_run / "best.pth"), "--dataset", "rsna", "--data_dir", str(data)]
    arguments += ["--bootstrap", "20", "--num_workers", "0", "--boxes", "none", "--out", str(out), *extra]
    return evaluate.evaluate(evaluate.parse_args(arguments))


def test_rsna_films_of_the_nih_patients_the_run_saw_are_left_out_and_counted(trained_run, learn_dir, chosen, tmp_path):
    films, split = chosen
    seen = set(split.patient_id[split.split.isin(["train", "val"])])  # the run's own record of its patients
    expected_left = int(films.patient_id.isin(seen).sum())
    assert expected_left == TRAIN_FILMS  # the official lists keep the test patients apart
    data = write_rsna_copies(tmp_path / "rsna", learn_dir, films.image_name)
    report = evaluate_rsna(trained_run, data, tmp_path / "report")
    assert report["images"] == len(films) - expected_left == TEST_FILMS
    assert report["left_out"][NIH_COPIES] == expected_left
    assert report["patients"] == films.patient_id[~films.patient_id.isin(seen)].nunique()  # NIH's patients, not films
    assert "not_external" not in report and report["nih_mapping"].endswith(".json")
    scored = pd.read_csv(tmp_path / "report" / "predictions.csv")
    assert len(scored) == TEST_FILMS


def test_without_the_mapping_every_film_is_scored_and_the_report_says_it_is_not_external(
    trained_run, learn_dir, chosen, tmp_path, capsys
):
    films, _ = chosen
    data = write_rsna_copies(tmp_path / "rsna", learn_dir, films.image_name, mapping=None)
    report = evaluate_rsna(trained_run, data, tmp_path / "report")
    assert report["images"] == len(films) and report["not_external"] == NOT_EXTERNAL
    assert "NOT EXTERNAL" in capsys.readouterr().out
    given = tmp_path / "elsewhere"  # the mapping given where it does not sit beside the labels
    write_rsna_copies(given, learn_dir, films.image_name, mapping="csv")
    report = evaluate_rsna(
        trained_run, data, tmp_path / "again", "--rsna_mapping", str(given / "pneumonia_dataset_mapping.csv")
    )
    assert report["images"] == TEST_FILMS and "not_external" not in report


def test_a_union_with_nih_keeps_each_nih_patient_in_one_part(trained_run, learn_dir, chosen, tmp_path):
    import train

    films, _ = chosen
    data = write_rsna_copies(tmp_path / "rsna", learn_dir, films.image_name, mapping="csv")
    settings = train.parse_settings(tiny_settings(f"{learn_dir},{data}", "unused", dataset="nih,rsna")).data
    union = read_training_films(settings)
    rows = union.rows.assign(split=union.split)
    nih = rows[rows.dataset == "nih"].set_index("patient_id").split
    copies = rows[rows.dataset == "rsna"]
    assert len(copies) == len(films)
    assert list(copies.patient_id) == [f"nih:{patient}" for patient in films.patient_id]
    assert (copies.split.to_numpy() == nih.groupby(level=0).first()[copies.patient_id].to_numpy()).all()
    assert set(copies.split[:TEST_FILMS]) == {"test"}  # NIH's test patients' copies are tested, never trained
    assert (copies.nih_image.to_numpy() == films.image_name.to_numpy()).all()
    (data / "pneumonia_dataset_mapping.csv").unlink()
    with pytest.warns(UserWarning, match=NOT_KEPT_APART[:60].replace("(", r"\(")):
        read_training_films(settings)


def test_a_mapping_that_names_no_nih_film_is_refused_naming_its_row(tmp_path):
    path = tmp_path / "pneumonia_dataset_mapping.csv"
    path.write_text("subset_img_id,img_id\nabc,00000013_005.png\ndef,IM-0001.jpeg\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"pneumonia_dataset_mapping.csv, row 3: img_id 'IM-0001.jpeg' is no NIH"):
        read_rsna_mapping(path)
    path.write_text("subset_img_id,img_id\nabc,00000013_005\n", encoding="utf-8")  # NIH CC's CSV may drop .png
    assert read_rsna_mapping(path) == {"abc": "00000013_005.png"} and nih_patient("00000013_005.png") == 13
    broken = tmp_path / "mapping.json"
    broken.write_text('{"subset_img_id": ', encoding="utf-8")
    with pytest.raises(DataError, match="mapping.json: not RSNA's mapping"):
        read_rsna_mapping(broken)
