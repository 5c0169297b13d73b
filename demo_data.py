"""A synthetic ChestX-ray14 in NIH's exact layout, so everything runs with no download.

    python demo_data.py --out data/demo [--patients 600] [--size 128] [--seed 0] [--layout nih|chexpert]

Writes Data_Entry_2017_v2020.csv (the NIH columns), train_val_list.txt / test_list.txt (split by patient),
BBox_List_2017.csv (NIH's format, for the 8 findings NIH boxed) and images_00K/images/PPPPPPPP_FFF.png. Each
image is a procedural chest-radiograph phantom (body, lungs, ribs, spine, heart) on which every one of the 14
findings, when present, has its own look, place and size (FINDING_LOOKS; docs/data.md shows them). Prevalences
keep NIH's order (Infiltration most common, Hernia rarest) compressed so that every finding has at least 15
positives in the test split; findings co-occur as on NIH (effusion with atelectasis and cardiomegaly, pneumonia
with infiltration and consolidation, mass with nodule); a chronic finding persists over a patient's follow-ups;
and LABEL_NOISE of the labels disagree with the film, as NIH's text-mined labels do. Deterministic for a seed;
numpy and Pillow (and dataset.py's FINDINGS) only.

--layout chexpert writes the same phantoms as another hospital's: CheXpert-v1.0-small's train.csv and valid.csv
(1, 0, -1 and blank labels, laterals beside some frontal films) and JPEGs (write_chexpert_demo).
"""

import argparse
import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from cxr14.phantom import Phantom
from dataset import FINDINGS

NIH_POSITIVES = {  # positives per finding in the full release (of 112,120 images)
    "Atelectasis": 11559,
    "Cardiomegaly": 2776,
    "Effusion": 13317,
    "Infiltration": 19894,
    "Mass": 5782,
    "Nodule": 6331,
    "Pneumonia": 1431,
    "Pneumothorax": 5302,
    "Consolidation": 4667,
    "Edema": 2303,
    "Emphysema": 2516,
    "Fibrosis": 1686,
    "Pleural_Thickening": 3385,
    "Hernia": 227,
}
PREVALENCE_MOST, PREVALENCE_LEAST = 0.24, 0.045  # Infiltration's and Hernia's share of the demo's images; the
# others in between by a power of NIH's counts (same order, the 88:1 range compressed to about 5:1)
PERSISTENCE = {  # share of a finding's tendency that is the patient's (the rest is the film's): chronic ones persist
    "Cardiomegaly": 0.8,
    "Emphysema": 0.8,
    "Fibrosis": 0.8,
    "Pleural_Thickening": 0.7,
    "Hernia": 0.6,
    "Mass": 0.6,
    "Nodule": 0.6,
}
CO_OCCURRING = {  # NIH's frequent companions share a factor
    "fluid": ("Effusion", "Edema", "Cardiomegaly", "Atelectasis"),
    "airspace": ("Infiltration", "Pneumonia", "Consolidation", "Atelectasis"),
    "lesion": ("Mass", "Nodule"),
    "chronic": ("Emphysema", "Fibrosis", "Pleural_Thickening"),
}
LABEL_NOISE = 0.04  # share of positive labels whose finding is not on the film, and as many drawn findings unlabelled
FINDING_LOOKS = {  # what each finding looks like on the phantom (docs/data.md, "The demo dataset")
    "Atelectasis": "a thin bright plate-like band, tilted, in the lower half of one lung",
    "Cardiomegaly": "the heart 1.4-1.6 times wider",
    "Effusion": "fluid filling one lung base (sometimes both), higher at the chest wall (the meniscus)",
    "Infiltration": "faint patchy ill-defined haze in one zone of a lung (subtle)",
    "Mass": "a round opacity of 10-15% of the chest's width in a lung field",
    "Nodule": "a small round opacity of 3.5-5.5% of the chest's width (subtle)",
    "Pneumonia": "a dense blob in a lower zone, crossed by dark air bronchograms",
    "Pneumothorax": "black air without lung markings at an apex, behind a thin pleural line",
    "Consolidation": "a dense homogeneous opacity in an upper or middle zone with a flat lower border (a fissure)",
    "Edema": "symmetric haze around both hila (the bat wing) and short horizontal Kerley lines at the bases",
    "Emphysema": "larger, darker lungs with flat, low diaphragms",
    "Fibrosis": "a coarse reticular net in both lower outer zones, lungs slightly smaller",
    "Pleural_Thickening": "a bright band along the outer wall and apex of one lung",
    "Hernia": "a round gas bubble with an air-fluid level behind the lower heart",
}
BOXED = {  # the findings NIH's BBox_List_2017.csv has boxes for, with the spelling it uses
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Effusion": "Effusion",
    "Infiltration": "Infiltrate",
    "Mass": "Mass",
    "Nodule": "Nodule",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}
NIH_MALE = 0.565  # NIH ChestX-ray14: 63,340 of its 112,120 films are of men
NIH_AGE = (46.9, 16.8)  # and its patients' age, mean and standard deviation in years
IMAGES_PER_FOLDER = 500  # NIH packs ~10,000 per archive; smaller here so the demo has several folders
TEST_FRACTION = 0.25  # of patients, as NIH's test_list (about 23%)
CSV_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)


def prevalences():
    """The demo's share of images per finding: NIH's order, compressed range (PREVALENCE_MOST to _LEAST)."""
    counts = np.array([NIH_POSITIVES[finding] for finding in FINDINGS], dtype=float)
    power = np.log(PREVALENCE_MOST / PREVALENCE_LEAST) / np.log(counts.max() / counts.min())
    return PREVALENCE_MOST * (counts / counts.max()) ** power


def assign_labels(rng, patient_of_image, in_test):
    """[images, 14] labels: each finding's positives are the images of highest tendency, exactly the prevalence in
    the test split and in the rest. A tendency mixes the patient's (chronic findings persist), a shared factor of
    its companions (CO_OCCURRING), the film's general sickness and noise."""
    images, patients = len(patient_of_image), patient_of_image.max() + 1
    sickness = rng.normal(size=images)
    groups = {name: rng.normal(size=images) for name in CO_OCCURRING}
    labels = np.zeros((images, len(FINDINGS)), dtype=bool)
    for k, (finding, prevalence) in enumerate(zip(FINDINGS, prevalences())):
        persistent = PERSISTENCE.get(finding, 0.3)
        patient_part = rng.normal(size=patients)[patient_of_image]
        companions = sum(groups[name] for name, members in CO_OCCURRING.items() if finding in members)
        tendency = (
            np.sqrt(persistent) * patient_part
            + np.sqrt(1 - persistent) * rng.normal(size=images)
            + 0.7 * companions
            + 0.6 * sickness
        )
        for part in (in_test, ~in_test):
            rows = np.flatnonzero(part)
            top = rows[np.argsort(-tendency[rows])[: int(round(prevalence * len(rows)))]]
            labels[top, k] = True
    return labels


def add_label_noise(rng, labels):
    """The findings drawn on each film: the labels, with LABEL_NOISE of the positives left undrawn and as many
    unlabelled findings drawn (the labels were text-mined from reports; they miss and invent findings)."""
    drawn = labels.copy()
    missed = labels & (rng.random(labels.shape) < LABEL_NOISE)
    invented = ~labels & (rng.random(labels.shape) < LABEL_NOISE * labels.mean(0) / (1 - labels.mean(0)))
    drawn[missed] = False
    drawn[invented] = True
    return drawn


# ----------------------------------------------------------------------------- drawing


def demographics(rng):
    """A patient's (age, sex) as NIH's are distributed: 56.5% men, ages about 47 +- 17 years (children included);
    independent of the findings, so that the subgroup report finds no gap that was planted."""
    age = int(np.clip(np.round(rng.normal(NIH_AGE[0], NIH_AGE[1])), 1, 95))
    return age, "M" if rng.random() < NIH_MALE else "F"


def write_demo(out, patients=600, size=128, seed=0):
    """Write the dataset; returns the number of images."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    test_patients = set(rng.permutation(patients)[: int(round(TEST_FRACTION * patients))] + 1)
    follow_ups = [min(1 + int(np.random.default_rng([seed, 4, p]).geometric(0.4)), 8) for p in range(1, patients + 1)]
    patient_of_image = np.repeat(np.arange(patients), follow_ups)
    in_test = np.isin(patient_of_image + 1, list(test_patients))
    labels = assign_labels(np.random.default_rng([seed, 2]), patient_of_image, in_test)
    drawn = add_label_noise(np.random.default_rng([seed, 3]), labels)
    rows, boxes, image_index = [], [], 0
    for patient_id in range(1, patients + 1):
        rng = np.random.default_rng([seed, 0, patient_id])
        anatomy = {
            "body_width": rng.uniform(0.78, 0.92),
            "heart_radius": rng.uniform(0.19, 0.23),
            "lung_height": rng.uniform(0.5, 0.56),
        }
        rng.integers(18, 90), rng.integers(2)  # drawn as before, so that every film stays as it was
        age, sex = demographics(np.random.default_rng([seed, 5, patient_id]))
        for follow_up in range(follow_ups[patient_id - 1]):
            name = f"{patient_id:08d}_{follow_up:03d}.png"
            film = {finding for finding, on in zip(FINDINGS, drawn[image_index]) if on}
            exposure = rng.uniform(0.88, 1.12)
            pixels, drawn_boxes = Phantom(rng, size, {**anatomy, "exposure": exposure}, film).draw()
            folder = out / f"images_{image_index // IMAGES_PER_FOLDER + 1:03d}" / "images"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / name, compress_level=1)
            labelled = [finding for finding, on in zip(FINDINGS, labels[image_index]) if on]
            spacing = round(0.143 * 2500 / size, 4)
            view = "PA" if rng.random() < 0.6 else "AP"
            rows.append(
                [name, "|".join(labelled) or "No Finding", follow_up, patient_id, age, sex, view, size, size]
                + [spacing, spacing]
            )
            # NIH's radiologists boxed labelled findings they could see
            boxes += [[name, BOXED[f], *box] for f, box in drawn_boxes.items() if f in labelled and f in BOXED]
            image_index += 1
    _write_tables(out, rows, boxes, test_patients)
    return len(rows)


def _write_tables(out, rows, boxes, test_patients):
    with open(out / "Data_Entry_2017_v2020.csv", "w", newline="", encoding="utf-8") as file:
        file.write(CSV_HEADER + "\n")
        csv.writer(file).writerows(rows)
    with open(out / "BBox_List_2017.csv", "w", newline="", encoding="utf-8") as file:
        file.write("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
        csv.writer(file).writerows(boxes)
    test = [row[0] for row in rows if row[3] in test_patients]
    train_val = [row[0] for row in rows if row[3] not in test_patients]
    (out / "test_list.txt").write_text("\n".join(test) + "\n", encoding="utf-8")
    (out / "train_val_list.txt").write_text("\n".join(train_val) + "\n", encoding="utf-8")


CHEXPERT_COLUMNS = {  # CheXpert's labeler columns (train.csv's order) -> the demo findings that make each positive
    "No Finding": (),
    "Enlarged Cardiomediastinum": (),
    "Cardiomegaly": ("Cardiomegaly",),
    "Lung Opacity": (),
    "Lung Lesion": ("Mass", "Nodule"),
    "Edema": ("Edema",),
    "Consolidation": ("Consolidation",),
    "Pneumonia": ("Pneumonia",),
    "Atelectasis": ("Atelectasis",),
    "Pneumothorax": ("Pneumothorax",),
    "Pleural Effusion": ("Effusion",),
    "Pleural Other": (),
    "Fracture": (),
    "Support Devices": (),
}
CHEXPERT_UNCERTAIN = 0.1  # share of positive labels the CheXpert-layout demo writes as -1 (uncertain)
CHEXPERT_BLANK = 0.7  # share of negative labels it leaves blank ("not mentioned", a negative)
CHEXPERT_LATERALS = 0.2  # share of studies with a lateral film too (left out of training and evaluation)
CHEXPERT_GAMMA = 0.8  # another hospital's scanner: the same phantoms, brighter mid-tones, saved as JPEG


def write_chexpert_demo(out, patients=600, size=128, seed=0):
    """The demo's phantoms in CheXpert-v1.0-small's layout: train.csv and valid.csv (Path, Sex, Age,
    Frontal/Lateral, AP/PA and the 14 labeler columns: 1, 0, -1 or blank), train/ and valid/patientNNNNN/studyK/
    view1_frontal.jpg (view2_lateral.jpg for some). The demo's test patients are valid.csv's. Returns the number of
    films written."""
    out = Path(out)
    staging = out / "nih_layout.partial"
    write_demo(staging, patients, size, seed)
    with open(staging / "Data_Entry_2017_v2020.csv", newline="", encoding="utf-8") as file:
        entries = list(csv.DictReader(file))
    test = set((staging / "test_list.txt").read_text(encoding="utf-8").split())
    paths = {path.name: path for path in staging.rglob("*.png")}
    rng = np.random.default_rng([seed, 6])
    tables, written = {"train": [], "valid": []}, 0
    for entry in entries:
        part = "valid" if entry["Image Index"] in test else "train"
        study = int(entry["Follow-up #"]) + 1
        labels = set(entry["Finding Labels"].split("|"))
        values = {}
        for column, findings in CHEXPERT_COLUMNS.items():
            if column == "No Finding":
                values[column] = "1.0" if labels == {"No Finding"} else ""
            elif not findings:
                values[column] = ""
            elif labels & set(findings):
                values[column] = "-1.0" if rng.random() < CHEXPERT_UNCERTAIN else "1.0"
            else:
                values[column] = "" if rng.random() < CHEXPERT_BLANK else "0.0"
        pixels = np.asarray(Image.open(paths[entry["Image Index"]]), dtype=np.float64) / 255
        film = Image.fromarray(np.round(255 * pixels**CHEXPERT_GAMMA).astype(np.uint8))
        views = [("view1_frontal", "Frontal", entry["View Position"], film)]
        if rng.random() < CHEXPERT_LATERALS:
            views.append(("view2_lateral", "Lateral", "", film.transpose(Image.Transpose.ROTATE_90)))
        for view, frontal, projection, image in views:
            relative = f"{part}/patient{int(entry['Patient ID']):05d}/study{study}/{view}.jpg"
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            image.save(out / relative, quality=90)
            sex = {"M": "Male", "F": "Female"}[entry["Patient Gender"]]
            tables[part].append(
                {
                    "Path": f"CheXpert-v1.0-small/{relative}",
                    "Sex": sex,
                    "Age": entry["Patient Age"],
                    "Frontal/Lateral": frontal,
                    "AP/PA": projection,
                    **values,
                }
            )
            written += 1
    for part, rows in tables.items():
        with open(out / f"{part}.csv", "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_COLUMNS])
            writer.writeheader()
            writer.writerows(rows)
    shutil.rmtree(staging)
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/demo", help="output folder (default: %(default)s)")
    parser.add_argument("--patients", type=int, default=600, help="patients (~3.4 images each; default: %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--layout",
        choices=("nih", "chexpert"),
        default="nih",
        help="NIH's files, or CheXpert-v1.0-small's (train.csv, valid.csv, JPEGs; -1 and blank labels) "
        "(default: %(default)s)",
    )
    args = parser.parse_args()
    write = write_chexpert_demo if args.layout == "chexpert" else write_demo
    count = write(args.out, args.patients, args.size, args.seed)
    print(f"wrote {count} images of {args.patients} patients ({args.size} px, {args.layout} layout) to {args.out}")


if __name__ == "__main__":
    main()
