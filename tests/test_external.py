"""External validation: CheXpert, MIMIC-CXR-JPG and PadChest layouts written from demo films, with the demo's labels
translated into each dataset's vocabulary. A model that learnt the demo scores its drawn findings well only if the
mapping is right; laterals are left out and counted; uncertain labels follow --uncertain."""

from pathlib import Path

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
    labels = labels[
        labels.image_name.isin((learn_dir / "test_list.txt").read_text(encoding="utf-8").split())
    ].reset_index(drop=True)
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


def test_a_hospitals_own_csv_is_evaluated_on_the_findings_it_has(trained_run, films, tmp_path):
    """--dataset csv: the file's finding columns are scored (blank left out), its laterals left out."""
    labels, images = films
    table = []
    for k, pixels in enumerate(images):
        Image.fromarray(pixels).save(tmp_path / f"{k}.png")
        effusion = "" if k % 5 == 0 else str(int(labels.Effusion[k]))
        table.append({"path": f"{k}.png", "patient_id": labels.patient_id[k], "Effusion": effusion, "view": "PA"})
    table[0]["view"] = "LATERAL"
    pd.DataFrame(table).assign(Cardiomegaly=labels.Cardiomegaly.astype(int)).to_csv(tmp_path / "mine.csv", index=False)
    report = run(trained_run, tmp_path, "csv", tmp_path, "--csv", "mine.csv")
    assert report["images"] == len(labels) - 1 and report["laterals_left_out"] == 1
    rows = {row["finding"]: row for row in report["findings"]}
    assert list(rows) == ["Cardiomegaly", "Effusion"]
    assert rows["Effusion"]["images"] == len(labels) - 1 - len(range(5, len(labels), 5))  # blanks left out
    assert rows["Cardiomegaly"]["images"] == len(labels) - 1 and rows["Cardiomegaly"]["auroc"] > 0.75


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
    from cxr14.errors import DataError

    labels, images = films
    data = write_chexpert(tmp_path, labels.iloc[:20].reset_index(drop=True), images[:20])
    next(data.rglob("view1_frontal.jpg")).unlink()
    with pytest.raises(DataError, match="are not where it says"):
        run(trained_run, tmp_path, "chexpert", data)
    with pytest.raises(DataError, match="label file not found"):
        run(trained_run, tmp_path, "mimic", data)


def test_unusable_rows_are_named(tmp_path):
    from cxr14.errors import DataError
    from cxr14.external import read_external

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


def chexpert_layout(tmp_path, values):
    """A CheXpert valid.csv of one frontal film per row of `values` (its mapped columns), the films blank."""
    data = tmp_path / "CheXpert-v1.0-small"
    rows = []
    for k in range(len(values)):
        relative = f"CheXpert-v1.0-small/valid/patient{k:05d}/study1/view1_frontal.jpg"
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / relative)
        rows.append({"Path": relative, "Frontal/Lateral": "Frontal", "AP/PA": "PA", "Sex": "Female", "Age": 50})
    table = pd.concat([pd.DataFrame(rows), values], axis=1)
    for column in CHEXPERT_COLUMNS:
        table[column] = table.get(column, np.nan)
    table.to_csv(data / "valid.csv", index=False)
    return data


def test_a_blank_chexpert_label_is_negative_under_every_policy_and_only_minus_one_follows_it(tmp_path):
    """Blank is "not mentioned": the labeler's authors read it as negative. Dropping blanks, as before, counted a
    "No Finding" film for no finding at all and shrank the negatives many fold."""
    from cxr14.external import read_external

    cardiomegaly = [1.0, 0.0, -1.0, np.nan, np.nan, np.nan]  # a positive, a negative, an uncertain, three blanks
    data = chexpert_layout(tmp_path, pd.DataFrame({"Cardiomegaly": cardiomegaly}))
    expected = {"ignore": [1, 0, np.nan, 0, 0, 0], "zeros": [1, 0, 0, 0, 0, 0], "ones": [1, 0, 1, 0, 0, 0]}
    for policy, values in expected.items():
        rows = read_external("chexpert", data, uncertain=policy).rows
        np.testing.assert_array_equal(rows["Cardiomegaly"].to_numpy(), values)
        assert (rows["Edema"] == 0).all()  # a column blank for every film: all negative
    assert set(read_external("chexpert", data).rows.sex) == {"F"}  # kept for the subgroup report


def padchest_layout(tmp_path, label_lists, **columns):
    data = tmp_path / "padchest"
    data.mkdir(exist_ok=True)
    names = [f"{k:04d}.png" for k in range(len(label_lists))]
    for name in names:
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(data / name)
    table = {"ImageID": names, "PatientID": [f"p{k}" for k in range(len(names))], "Projection": "PA"}
    table |= {"Labels": [str(labels) for labels in label_lists], **columns}
    pd.DataFrame(table).to_csv(data / "PADCHEST_labels.csv", index=False)
    return data


@pytest.mark.parametrize(
    "label, finding",
    [
        ("atelectasis basal", "Atelectasis"),
        ("round atelectasis", "Atelectasis"),
        ("loculated pleural effusion", "Effusion"),
        ("loculated fissural effusion", "Effusion"),
        ("atypical pneumonia", "Pneumonia"),
        ("hydropneumothorax", "Pneumothorax"),
        ("calcified pleural thickening", "Pleural_Thickening"),
        ("air bronchogram", "Consolidation"),
    ],
)
def test_padchest_synonyms_are_positives_of_their_finding(tmp_path, label, finding):
    from cxr14.external import read_external

    rows = read_external("padchest", padchest_layout(tmp_path, [[label], ["normal"]])).rows
    assert rows[finding].tolist() == [1.0, 0.0]
    others = [name for name in PADCHEST_NAMES if name not in (finding, "Infiltration")]
    assert (rows.loc[0, others] == 0).all()  # and nothing else


def test_padchest_lookalikes_exclusions_patterns_and_ages(tmp_path):
    """Exact labels, never substrings; films marked exclude or labelled with nothing left out and counted;
    suboptimal studies kept; an alveolar or interstitial pattern is neither an Infiltration nor its absence."""
    from cxr14.external import read_external

    lists = [
        ["pericardial effusion"],
        ["pseudonodule"],
        ["subcutaneous emphysema"],
        ["mediastinal mass"],
        ["soft tissue mass"],
        ["interstitial pattern"],
        ["alveolar pattern", "infiltrates"],
        ["exclude"],
        [],
        ["suboptimal study", "cardiomegaly"],
        ["normal"],
    ]
    births, studies = [1950] * 10 + [2012], [20150101] * 11  # the last film: a 3-year-old
    data = padchest_layout(tmp_path, lists, PatientBirth=births, StudyDate_DICOM=studies)
    external = read_external("padchest", data)
    rows = external.rows
    assert len(rows) == 9 and external.left_out["labelled 'exclude' by PadChest"] == 1
    assert external.left_out["with an empty label list"] == 1
    assert rows.Effusion[0] == rows.Nodule[1] == rows.Emphysema[2] == rows.Mass[3] == rows.Mass[4] == 0
    assert np.isnan(rows.Infiltration[5]) and rows.Infiltration[6] == 1 and rows.Infiltration[8] == 0
    assert rows.Cardiomegaly[7] == 1 and rows.age[8] == 3
    older = read_external("padchest", data, min_age=11)
    assert len(older.rows) == 8 and older.left_out["younger than 11 or of unknown age"] == 1


def test_missing_and_broken_films_are_skipped_and_named_with_the_flag_and_an_error_without(
    trained_run, films, tmp_path
):
    from cxr14.errors import DataError

    labels, images = films
    data = write_chexpert(tmp_path, labels.iloc[:24].reset_index(drop=True), images[:24])
    frontal = sorted(data.rglob("view1_frontal.jpg"))
    frontal[0].unlink()
    frontal[1].write_bytes(frontal[1].read_bytes()[:200])  # a truncated download
    with pytest.raises(DataError, match="--drop_missing_images"):
        run(trained_run, tmp_path, "chexpert", data)
    with pytest.warns(UserWarning, match="missing"):
        report = run(trained_run, tmp_path, "chexpert", data, "--drop_missing_images")
    assert report["skipped"]["missing"] == [str(frontal[0])] and report["skipped"]["unreadable"] == [str(frontal[1])]
    assert report["images"] == 22
    frontal[0].write_bytes(frontal[2].read_bytes())  # only the broken film now: still an error without the flag
    with pytest.raises(DataError, match=r"1 film\(s\) cannot be read .*" + frontal[1].name):
        run(trained_run, tmp_path, "chexpert", data)


VINDR_CLASSES = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Infiltration": "Infiltration",
    "Mass": "Nodule/Mass",
    "Nodule": "Nodule/Mass",
    "Effusion": "Pleural effusion",
    "Pleural_Thickening": "Pleural thickening",
    "Pneumothorax": "Pneumothorax",
    "Fibrosis": "Pulmonary fibrosis",
}


@pytest.fixture(scope="module")
def boxed_films(learn_dir, films):
    """The test films' boxes, in NIH's format (the demo draws them)."""
    from cxr14.localisation import read_boxes

    labels, _ = films
    boxes = read_boxes(learn_dir / "BBox_List_2017.csv")
    return boxes[boxes.image_name.isin(labels.image_name)]


@pytest.mark.slow  # 150 DICOMs evaluated and localised: about 18 s on 2 cores (RSNA's test covers DICOM boxes quickly)
def test_vindr_dicoms_three_readers_and_their_boxes(trained_run, films, boxed_films, tmp_path):
    """VinDr-CXR's layout, DICOM films (some MONOCHROME1), a row per radiologist and finding: any reader makes a
    finding positive (a majority rule is an option), and every reader's box feeds the localisation report."""
    from helpers import write_dicom

    labels, images = films
    labels, images = labels.iloc[:150], images[:150]  # enough for the figures; localisation costs per film
    data = tmp_path / "vindr"
    (data / "train").mkdir(parents=True)
    rows = []
    for k, pixels in enumerate(images):
        image_id = f"{k:032x}"
        inverted = k % 4 == 0  # MONOCHROME1: bright air, as some of VinDr's films
        values = (255 - pixels if inverted else pixels).astype(np.uint16) * 16
        write_dicom(
            data / "train" / f"{image_id}.dicom",
            values,
            PhotometricInterpretation="MONOCHROME1" if inverted else "MONOCHROME2",
        )
        marked = [finding for finding in VINDR_CLASSES if labels.loc[k, finding]]
        readers = ["R1", "R2"] if k % 2 else ["R1"]  # odd films: two readers agree; even films: one alone
        for finding in marked:
            box = boxed_films[(boxed_films.image_name == labels.image_name[k]) & (boxed_films.finding == finding)]
            corners = [np.nan] * 4  # NIH boxed 8 findings; the others are marked without a box here
            if len(box):
                b = box.iloc[0]
                corners = [b.x, b.y, b.x + b.w, b.y + b.h]
            for reader in readers:
                rows.append([image_id, VINDR_CLASSES[finding], 0, reader, *corners])
        for reader in ("R1", "R2", "R3"):  # a reader who marked nothing on a film says so
            if not marked or reader not in readers:
                rows.append([image_id, "No finding", 14, reader, np.nan, np.nan, np.nan, np.nan])
    columns = ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]
    table = pd.DataFrame(rows, columns=columns)
    table.to_csv(data / "train.csv", index=False)
    report = run(trained_run, tmp_path, "vindr", data)
    assert report["images"] == len(labels) and report["vindr_rule"] == "any"
    assert auroc(report, "Cardiomegaly") > 0.75 and auroc(report, "Effusion") > 0.75
    positives = {row["finding"]: row["positives"] for row in report["findings"]}
    assert positives["Effusion"] == labels.Effusion.sum()
    boxes_written = table.dropna(subset=["x_min"]).groupby("class_name").size()
    assert report["localisation"]["Cardiomegaly"]["boxes"] == boxes_written["Cardiomegaly"]
    assert report["localisation"]["Mass/Nodule"]["boxes"] == boxes_written["Nodule/Mass"]
    majority = run(trained_run, tmp_path, "vindr", data, "--vindr_rule", "majority", "--boxes", "none")
    odd = labels.Effusion[1::2].sum()  # only the odd films had two readers
    assert next(r["positives"] for r in majority["findings"] if r["finding"] == "Effusion") == odd


def test_rsna_pneumonia_dicoms_and_boxes(trained_run, films, boxed_films, tmp_path):
    from helpers import write_dicom

    labels, images = films
    labels, images = labels.iloc[:150], images[:150]
    data = tmp_path / "rsna"
    (data / "stage_2_train_images").mkdir(parents=True)
    rows = []
    for k, pixels in enumerate(images):
        patient = f"{k:08x}-0000-4000-8000-{k:012x}"
        write_dicom(data / "stage_2_train_images" / f"{patient}.dcm", pixels.astype(np.uint16) * 16)
        box = boxed_films[(boxed_films.image_name == labels.image_name[k]) & (boxed_films.finding == "Pneumonia")]
        if labels.Pneumonia[k] and len(box):
            rows += [[patient, b.x, b.y, b.w, b.h, 1] for b in box.itertuples()]
        else:
            rows.append([patient, np.nan, np.nan, np.nan, np.nan, int(labels.Pneumonia[k])])
    table = pd.DataFrame(rows, columns=["patientId", "x", "y", "width", "height", "Target"])
    table.to_csv(data / "stage_2_train_labels.csv", index=False)
    report = run(trained_run, tmp_path, "rsna", data)
    assert report["images"] == len(labels) and [row["finding"] for row in report["findings"]] == ["Pneumonia"]
    assert auroc(report, "Pneumonia") > 0.75
    assert report["localisation"]["Pneumonia"]["boxes"] == int(table.x.notna().sum()) > 10


def test_expert_labels_score_the_same_test_films_against_nih_and_the_experts(trained_run, learn_dir, tmp_path):
    from sklearn.metrics import roc_auc_score

    from helpers import predict_split

    split = pd.read_csv(trained_run / "split.csv")
    labels = read_labels(learn_dir / "Data_Entry_2017_v2020.csv").set_index("image_name")
    test, train = split.image_name[split.split == "test"], split.image_name[split.split == "train"]
    chosen = list(test[::2]) + list(train[:20])  # the experts also read films the model trained on
    rng = np.random.default_rng(0)
    answer = lambda values: np.where(values > 0, "YES", "NO")  # noqa: E731
    opacity = labels.loc[chosen, ["Consolidation", "Pneumonia", "Infiltration"]].max(axis=1).to_numpy()
    flipped = opacity.copy()
    flipped[rng.choice(len(chosen), 15, replace=False)] ^= 1  # the experts disagree with NIH on some films
    table = pd.DataFrame(
        {
            "Image Index": chosen,
            "Patient ID": labels.loc[chosen, "patient_id"].to_numpy(),
            "Fracture": answer(rng.random(len(chosen)) < 0.05),
            "Pneumothorax": answer(labels.loc[chosen, "Pneumothorax"].to_numpy()),
            "Airspace opacity": answer(flipped),
            "Nodule or mass": answer(labels.loc[chosen, ["Mass", "Nodule"]].max(axis=1).to_numpy()),
            "Set Id": "test",
        }
    )
    table.to_csv(tmp_path / "google2019_nih-chest-xray-labels.csv", index=False)
    arguments = ["--checkpoint", str(trained_run / "best.pth"), "--bootstrap", "30", "--num_workers", "0"]
    arguments += ["--boxes", "none", "--out", str(tmp_path / "report")]
    arguments += ["--expert_labels", str(tmp_path / "google2019_nih-chest-xray-labels.csv")]
    report = evaluate.evaluate(evaluate.parse_args(arguments))
    experts = report["expert_labels"]
    assert experts["films_in_file"] == len(chosen) and experts["films_in_split"] == len(test[::2])
    assert experts["unscored"] == ["Fracture"]
    rows = {row["finding"]: row for row in experts["findings"]}
    logits, targets = predict_split(trained_run / "best.pth", learn_dir, "test")
    inside = np.isin(test.to_numpy(), chosen)
    k = FINDINGS.index("Pneumothorax")
    expected = roc_auc_score(targets[inside, k].numpy(), logits[inside, k].numpy())
    assert rows["Pneumothorax"]["nih_auroc"] == pytest.approx(expected, abs=1e-6)  # NIH labels, same films
    assert rows["Pneumothorax"]["expert_auroc"] == pytest.approx(expected, abs=1e-6)  # experts agree here
    assert rows["Airspace opacity"]["expert_auroc"] != rows["Airspace opacity"]["nih_auroc"]  # ... and not here
    assert (tmp_path / "report" / "expert_labels.csv").is_file()


def test_a_label_covering_two_findings_is_scored_by_the_higher_probability():
    from cxr14.external import MAPPINGS
    from cxr14.mappings import EXPERT_MAPPING, model_scores

    mapping = {name: findings for name, (_, findings) in MAPPINGS["chexpert"].items()}  # as read_external gives it
    probabilities = np.full((3, len(FINDINGS)), 0.1)
    mass, nodule, edema = (FINDINGS.index(name) for name in ("Mass", "Nodule", "Edema"))
    probabilities[0, mass], probabilities[1, nodule], probabilities[2, edema] = 0.9, 0.7, 0.4
    scores = model_scores(probabilities, mapping, list(FINDINGS))
    lesion, oedema = list(mapping).index("Mass/Nodule"), list(mapping).index("Edema")
    np.testing.assert_allclose(scores[:, lesion], [0.9, 0.7, 0.1])  # the max, not the mean (0.5, 0.4, 0.1)
    np.testing.assert_allclose(scores[:, oedema], [0.1, 0.1, 0.4])
    expert = model_scores(probabilities, EXPERT_MAPPING, list(FINDINGS))
    np.testing.assert_allclose(expert[:, list(EXPERT_MAPPING).index("Nodule or mass")], [0.9, 0.7, 0.1])


def test_min_age_keeps_a_film_of_exactly_that_age_and_drops_unknown_ages(tmp_path):
    from cxr14.external import read_external

    births = [2005, 2004, 2003, None, 1950]  # studied in 2015: aged 10, 11, 12, unknown, 65
    data = padchest_layout(tmp_path, [["cardiomegaly"]] * 5, PatientBirth=births, StudyDate_DICOM=[20150101] * 5)
    kept = read_external("padchest", data, min_age=11)
    assert sorted(kept.rows.age) == [11, 12, 65]
    assert kept.left_out["younger than 11 or of unknown age"] == 2
    assert len(read_external("padchest", data).rows) == 5  # without --min_age, every age


def vindr_layout(tmp_path, rows):
    """VinDr's train.csv of rows (image_id, class_name, rad_id, corners) and a small DICOM per film."""
    from helpers import write_dicom

    data = tmp_path / "vindr"
    (data / "train").mkdir(parents=True)
    for image_id in {row[0] for row in rows}:
        write_dicom(data / "train" / f"{image_id}.dicom", np.full((16, 16), 1000))
    columns = ["image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max"]
    pd.DataFrame(rows, columns=columns).to_csv(data / "train.csv", index=False)
    return data


def test_vindr_boxes_come_from_positive_films_only_with_their_exact_corners(tmp_path):
    from cxr14.external import read_external

    nan = np.nan
    data = vindr_layout(
        tmp_path,
        [
            ["a", "Cardiomegaly", "R1", 10, 20, 50, 80],  # film a: two readers agree
            ["a", "Cardiomegaly", "R2", 12, 22, 52, 82],
            ["b", "Cardiomegaly", "R1", 30, 40, 35, 60],  # film b: one reader of two
            ["b", "No finding", "R2", nan, nan, nan, nan],
        ],
    )
    majority = read_external("vindr", data, rule="majority")
    boxes = majority.boxes[majority.boxes.name == "Cardiomegaly"]
    assert list(boxes.image_name.map(lambda path: Path(path).stem)) == ["a", "a"]  # b is negative: no box
    first = boxes.iloc[0]
    assert (first.x, first.y, first.w, first.h) == (10, 20, 40, 60)  # width x_max - x_min, height y_max - y_min
    every = read_external("vindr", data, rule="any")
    assert len(every.boxes[every.boxes.name == "Cardiomegaly"]) == 3


def test_a_blank_expert_answer_leaves_the_film_out_of_that_finding_only(tmp_path):
    from cxr14.expert_labels import read_expert_labels
    from cxr14.report import two_label_table

    table = pd.DataFrame(
        {
            "Image Index": [f"0000000{k}_000.png" for k in range(1, 7)],
            "Fracture": ["NO"] * 6,
            "Pneumothorax": ["YES", "NO", "", "YES", "NO", "NO"],
            "Airspace opacity": ["NO", "YES", "NO", "NO", "YES", "NO"],
            "Nodule or mass": ["NO"] * 6,
            "Set Id": "test",
        }
    )
    table.to_csv(tmp_path / "experts.csv", index=False)
    labels = read_expert_labels(tmp_path / "experts.csv")
    assert np.isnan(labels.Pneumothorax[2]) and labels.Pneumothorax[1] == 0 and labels["Airspace opacity"][2] == 0
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.95, 0.3], [0.7, 0.2], [0.1, 0.9], [0.3, 0.2]])
    expert = labels[["Pneumothorax", "Airspace opacity"]].to_numpy()
    rows = two_label_table(["Pneumothorax", "Airspace opacity"], expert, expert, scores, np.arange(6), 10)
    # film 3 (blank) is out: positives 0.9 and 0.7 against negatives 0.2, 0.1, 0.3 -> AUROC 1; read as NO, its 0.95
    # would rank a negative above every positive (AUROC 0.75)
    assert rows[0]["images"] == 5 and rows[0]["expert_positives"] == 2 and rows[0]["expert_auroc"] == 1.0
    assert rows[1]["images"] == 6


def test_repeated_rows_are_refused_not_counted_twice(tmp_path):
    """40 films became 80 and their positives doubled (25.3); VinDr's row per radiologist is no repeat, the same
    reading twice is."""
    from cxr14.errors import DataError
    from cxr14.external import read_external

    data = chexpert_layout(tmp_path / "chexpert", pd.DataFrame({"Cardiomegaly": [1.0, 0.0, 1.0]}))
    table = pd.read_csv(data / "valid.csv")
    pd.concat([table, table.iloc[[0, 2]]]).to_csv(data / "valid.csv", index=False)
    with pytest.raises(DataError, match=r"valid.csv: 2 film\(s\) listed twice \(the repeat first at row\(s\) 5, 6\)"):
        read_external("chexpert", data)
    padchest = padchest_layout(tmp_path, [["normal"], ["cardiomegaly"]])
    table = pd.read_csv(padchest / "PADCHEST_labels.csv")
    pd.concat([table, table.iloc[[1]]]).to_csv(padchest / "PADCHEST_labels.csv", index=False)
    with pytest.raises(DataError, match=r"1 film\(s\) listed twice \(the repeat first at row\(s\) 4\)"):
        read_external("padchest", padchest)
    reading = ["a", "Cardiomegaly", "R1", 10, 20, 50, 80]
    vindr = vindr_layout(tmp_path, [reading, ["a", "Cardiomegaly", "R2", 10, 20, 50, 80]])
    assert len(read_external("vindr", vindr).boxes) == 2  # two radiologists, the same box: both kept
    pd.DataFrame([reading, reading], columns=pd.read_csv(vindr / "train.csv").columns).to_csv(vindr / "train.csv")
    with pytest.raises(DataError, match=r"1 reading\(s\) .* listed twice"):
        read_external("vindr", vindr)


@pytest.mark.parametrize("value", [2, "yes", "positive"])
def test_a_labeler_value_other_than_1_0_minus_1_or_blank_is_named(value, tmp_path):
    """A 2 raised scikit-learn's ValueError deep in the report; "yes" was read as a negative in silence (25.12)."""
    from cxr14.errors import DataError
    from cxr14.external import read_external

    data = chexpert_layout(tmp_path, pd.DataFrame({"Edema": [1.0, 0.0, 0.0, 1.0]}))
    table = pd.read_csv(data / "valid.csv").astype({"Edema": object})
    table.loc[2, "Edema"] = value
    table.to_csv(data / "valid.csv", index=False)
    with pytest.raises(DataError, match=rf"valid.csv, row 4: Edema is '?{value}'?, .* 1 \(positive\), 0 \(negative\)"):
        read_external("chexpert", data)


def test_a_path_outside_the_dataset_folder_is_refused_naming_its_row(tmp_path):
    """An absolute or ../ path in a label file was read with no warning (25.10)."""
    from cxr14.errors import DataError
    from cxr14.external import read_external

    data = chexpert_layout(tmp_path, pd.DataFrame({"Edema": [1.0, 0.0]}))
    table = pd.read_csv(data / "valid.csv")
    for path in ("/etc/passwd", "CheXpert-v1.0-small/../../secret/patient00001/study1/view1_frontal.jpg"):
        table.loc[1, "Path"] = path
        table.to_csv(data / "valid.csv", index=False)
        with pytest.raises(DataError, match="valid.csv, row 3: Path .* points outside the dataset's folder"):
            read_external("chexpert", data)


def test_padchest_labels_that_are_no_list_are_left_out_and_named(tmp_path):
    """Labels = "-1" raised a TypeError (25.15): it is a film without a readable label list."""
    from cxr14.external import read_external

    data = padchest_layout(tmp_path, [["normal"], ["cardiomegaly"], ["normal"]])
    table = pd.read_csv(data / "PADCHEST_labels.csv")
    table.loc[1, "Labels"] = "-1"
    table.to_csv(data / "PADCHEST_labels.csv", index=False)
    with pytest.warns(UserWarning, match=r"1 film\(s\) without a readable Labels list left out .*row 3"):
        read = read_external("padchest", data)
    assert len(read.rows) == 2 and read.left_out["without a readable Labels list"] == 1


def test_mimic_metadata_without_view_position_is_named(tmp_path):
    """A metadata file without ViewPosition raised pandas' ValueError (25.16)."""
    from cxr14.errors import DataError
    from cxr14.external import read_external

    data = tmp_path / "mimic"
    data.mkdir()
    pd.DataFrame({"subject_id": [1], "study_id": [2], "Edema": [1.0]}).to_csv(
        data / "mimic-cxr-2.0.0-chexpert.csv", index=False
    )
    pd.DataFrame({"dicom_id": ["d"], "subject_id": [1], "study_id": [2]}).to_csv(
        data / "mimic-cxr-2.0.0-metadata.csv", index=False
    )
    with pytest.raises(DataError, match=r"metadata.csv: missing column\(s\) \['ViewPosition'\]"):
        read_external("mimic", data)


def test_a_repeated_expert_film_is_refused_before_the_evaluation_starts(trained_run, tmp_path, monkeypatch):
    """A film twice in the expert-label file raised an IndexError after the whole evaluation (25.17)."""
    table = pd.DataFrame(
        {
            "Image Index": ["00000001_000.png", "00000002_000.png", "00000001_000.png"],
            **{name: ["NO"] * 3 for name in ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass")},
            "Set Id": "test",
        }
    )
    table.to_csv(tmp_path / "experts.csv", index=False)
    monkeypatch.setattr(evaluate, "evaluate_nih", lambda *args: pytest.fail("evaluated before checking the file"))
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(["--checkpoint", str(trained_run / "best.pth"), "--expert_labels", str(tmp_path / "experts.csv")])
    assert "experts.csv: 1 film(s) listed twice (the repeat first at row(s) 4)" in str(stopped.value.code)
