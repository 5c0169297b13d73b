"""External validation: CheXpert, MIMIC-CXR-JPG and PadChest layouts written from demo films, with the demo's labels
translated into each dataset's vocabulary. A model that learnt the demo scores its drawn findings well only if the
mapping is right; laterals are left out and counted; uncertain labels follow --uncertain."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import evaluate
from dataset import FINDINGS, read_labels

CHEXPERT_NAMES = {  # demo finding -> CheXpert column
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}
CHEXPERT_COLUMNS = ["No Finding", "Lung Lesion", "Fracture", "Support Devices", *CHEXPERT_NAMES.values()]
PADCHEST_NAMES = {
    "Atelectasis": "laminar atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Effusion": "pleural effusion",
    "Infiltration": "infiltrates",
    "Mass": "pulmonary mass",
    "Nodule": "nodule",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
    "Consolidation": "consolidation",
    "Edema": "pulmonary edema",
    "Emphysema": "emphysema",
    "Fibrosis": "pulmonary fibrosis",
    "Pleural_Thickening": "apical pleural thickening",
    "Hernia": "hiatal hernia",
}
LATERALS = 12


@pytest.fixture(scope="module")
def films(learn_dir):
    """The demo's test-split films and labels, and the films as 8-bit arrays."""
    labels = read_labels(learn_dir / "Data_Entry_2017_v2020.csv")
    labels = labels[labels.image_name.isin((learn_dir / "test_list.txt").read_text().split())].reset_index(drop=True)
    paths = {path.name: path for path in learn_dir.rglob("*.png")}
    return labels, [np.asarray(Image.open(paths[name])) for name in labels.image_name]


def chexpert_values(labels, uncertain_every=7):
    """CheXpert's columns: 1/0 from the demo labels, every `uncertain_every`-th Cardiomegaly -1, Fracture blank."""
    table = pd.DataFrame({column: labels[finding].astype(float) for finding, column in CHEXPERT_NAMES.items()})
    table["Lung Lesion"] = (labels.Mass | labels.Nodule).astype(float)
    table["No Finding"] = (labels[list(FINDINGS)].sum(axis=1) == 0).astype(float)
    table.loc[::uncertain_every, "Cardiomegaly"] = -1.0
    table["Fracture"], table["Support Devices"] = np.nan, 0.0
    return table


def write_chexpert(root, labels, images):
    data = root / "CheXpert-v1.0-small"
    rows = []
    for k, pixels in enumerate(images):
        for view in ("frontal", "lateral") if k < LATERALS else ("frontal",):
            relative = f"CheXpert-v1.0-small/valid/patient{64000 + labels.patient_id[k]}/study{k}/view1_{view}.jpg"
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / relative, quality=95)
            rows.append({"Path": relative, "Sex": "Male", "Age": 60, "Frontal/Lateral": view.title(), "k": k})
    table = pd.DataFrame(rows)
    table["AP/PA"] = np.where(table["Frontal/Lateral"] == "Frontal", "PA", "")
    values = chexpert_values(labels).iloc[table.pop("k")].reset_index(drop=True)
    pd.concat([table, values[CHEXPERT_COLUMNS]], axis=1).to_csv(data / "valid.csv", index=False)
    return data


def run(trained_run, tmp_path, dataset, data_dir, *extra):
    arguments = ["--checkpoint", str(trained_run / "best.pth"), "--dataset", dataset, "--data_dir", str(data_dir)]
    arguments += ["--bootstrap", "50", "--num_workers", "0", "--out", str(tmp_path / "report"), *extra]
    return evaluate.evaluate(evaluate.parse_args(arguments))


def auroc(report, name):
    return next(row["auroc"] for row in report["findings"] if row["finding"] == name)


def test_chexpert_frontal_films_mapped_findings_and_uncertain_labels(trained_run, films, tmp_path):
    labels, images = films
    data = write_chexpert(tmp_path, labels, images)
    report = run(trained_run, tmp_path, "chexpert", data)
    assert report["dataset"] == "chexpert" and report["images"] == len(labels)
    assert report["laterals_left_out"] == LATERALS and report["other_views_left_out"] == 0
    names = [row["finding"] for row in report["findings"]]
    assert names == [
        "Atelectasis",
        "Cardiomegaly",
        "Consolidation",
        "Edema",
        "Effusion",
        "Pneumonia",
        "Pneumothorax",
    ] + ["Mass/Nodule"]
    assert report["mapping"]["Mass/Nodule"] == ["Mass", "Nodule"]
    for name in ("Cardiomegaly", "Effusion", "Pneumothorax", "Edema", "Mass/Nodule"):  # drawn on the films
        assert auroc(report, name) > 0.75, (name, auroc(report, name))
    rows = {row["finding"]: row for row in report["findings"]}
    uncertain = len(range(0, len(labels), 7))
    assert rows["Cardiomegaly"]["images"] == len(labels) - uncertain  # ignore: the -1 films left out
    ones = run(trained_run, tmp_path, "chexpert", data, "--uncertain", "ones")
    zeros = run(trained_run, tmp_path, "chexpert", data, "--uncertain", "zeros")
    cardiomegaly = {
        policy: next(r for r in result["findings"] if r["finding"] == "Cardiomegaly")
        for policy, result in (("ones", ones), ("zeros", zeros))
    }
    assert cardiomegaly["ones"]["images"] == cardiomegaly["zeros"]["images"] == len(labels)
    assert cardiomegaly["ones"]["positives"] - cardiomegaly["zeros"]["positives"] == uncertain
    assert (tmp_path / "report" / "report.csv").is_file() and (tmp_path / "report" / "roc_curves.png").is_file()


def test_mimic_layout_joins_studies_and_views(trained_run, films, tmp_path):
    labels, images = films
    data = tmp_path / "mimic-cxr-jpg"
    metadata, studies = [], []
    for k, (pixels, patient) in enumerate(zip(images, labels.patient_id)):
        subject, study = 10000000 + int(patient), 50000000 + k
        views = ["PA", "LATERAL"] if k < LATERALS else ["AP" if k % 2 else "PA"]
        for j, view in enumerate(views):
            dicom = f"d{k:05d}v{j}"
            folder = data / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{dicom}.jpg", quality=95)
            metadata.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": view})
        studies.append({"subject_id": subject, "study_id": study})
    values = chexpert_values(labels)
    pd.concat([pd.DataFrame(studies), values[CHEXPERT_COLUMNS]], axis=1).to_csv(
        data / "mimic-cxr-2.0.0-chexpert.csv", index=False
    )
    pd.DataFrame(metadata).to_csv(data / "mimic-cxr-2.0.0-metadata.csv", index=False)
    report = run(trained_run, tmp_path, "mimic", data)
    assert report["images"] == len(labels) and report["laterals_left_out"] == LATERALS
    assert auroc(report, "Effusion") > 0.75 and auroc(report, "Pneumothorax") > 0.75


def test_padchest_label_lists_projections_and_16_bit_films(trained_run, films, tmp_path):
    labels, images = films
    data = tmp_path / "padchest"
    rows = []
    for k, pixels in enumerate(images):
        found = [PADCHEST_NAMES[f] for f in FINDINGS if labels.loc[k, f]] or ["normal"]
        for projection in ("PA", "L") if k < LATERALS else (["AP_horizontal", "PA", "AP"][k % 3],):
            name = f"{k:06d}_{projection}.png"
            (data / str(k % 3)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint16) * 257).save(data / str(k % 3) / name)  # 16-bit, as PadChest
            rows.append(
                {"ImageID": name, "ImageDir": k % 3, "PatientID": f"p{labels.patient_id[k]}", "Projection": projection}
                | {"Labels": str([" " + label for label in found])}  # PadChest's lists carry stray spaces
            )
    rows.append(
        {"ImageID": "costal.png", "ImageDir": 0, "PatientID": "x", "Projection": "COSTAL", "Labels": "['normal']"}
    )
    Image.fromarray(images[0]).save(data / "0" / "costal.png")
    pd.DataFrame(rows).to_csv(data / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", index=False)
    report = run(trained_run, tmp_path, "padchest", data)
    assert report["images"] == len(labels) and report["laterals_left_out"] == LATERALS
    assert report["other_views_left_out"] == 1
    assert [row["finding"] for row in report["findings"]] == list(FINDINGS)  # all 14 have a PadChest label
    positives = {row["finding"]: row["positives"] for row in report["findings"]}
    assert positives == {finding: int(labels[finding].sum()) for finding in FINDINGS}
    assert auroc(report, "Effusion") > 0.75 and auroc(report, "Cardiomegaly") > 0.75


def test_a_missing_film_or_label_file_is_named(trained_run, films, tmp_path):
    from errors import DataError

    labels, images = films
    data = write_chexpert(tmp_path, labels.iloc[:20].reset_index(drop=True), images[:20])
    next(data.rglob("view1_frontal.jpg")).unlink()
    with pytest.raises(DataError, match="are not where it says"):
        run(trained_run, tmp_path, "chexpert", data)
    with pytest.raises(DataError, match="label file not found"):
        run(trained_run, tmp_path, "mimic", data)


def test_unusable_rows_are_named(tmp_path):
    from errors import DataError
    from external import read_external

    data = tmp_path / "CheXpert-v1.0-small"
    (data / "valid").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "valid" / "film.jpg")
    columns = {column: [0.0] for column in CHEXPERT_COLUMNS}
    pd.DataFrame({"Path": ["CheXpert-v1.0-small/valid/film.jpg"], "Frontal/Lateral": ["Frontal"], **columns}).to_csv(
        data / "valid.csv", index=False
    )
    with pytest.raises(DataError, match=r"valid.csv, row 2: Path .* names no patientNNNNN folder"):
        read_external("chexpert", data)
    padchest = tmp_path / "padchest"
    padchest.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(padchest / name)
    table = {"ImageID": ["a.png", "b.png"], "PatientID": ["p1", "p2"], "Projection": ["PA", "PA"]}
    pd.DataFrame({**table, "Labels": ["['normal']", np.nan]}).to_csv(padchest / "PADCHEST_labels.csv", index=False)
    with pytest.warns(UserWarning, match="1 film.* without a readable Labels list left out .*row 3, b.png"):
        assert len(read_external("padchest", padchest).rows) == 1
