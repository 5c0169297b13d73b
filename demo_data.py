"""A synthetic ChestX-ray14 in NIH's exact layout, so everything runs with no download.

    python demo_data.py --out data/demo [--patients 400] [--size 128] [--seed 0]

Writes Data_Entry_2017_v2020.csv (the NIH columns), train_val_list.txt / test_list.txt (split by patient),
BBox_List_2017.csv (boxes of the drawn lesions, NIH's format) and images_00K/images/PPPPPPPP_FFF.png.
Each image is a procedural chest-radiograph phantom (body, lungs, ribs, spine, heart). Cardiomegaly,
Effusion, Mass, Nodule and Pneumothorax are drawn when labelled, so a model can learn them; the other nine
findings are labels only, at NIH's prevalence. Deterministic for a seed; numpy and Pillow only.
"""

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

FINDINGS = (  # NIH order; dataset.py holds the same tuple (this file stays free of project imports)
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
DRAWN_PREVALENCE = {  # higher than NIH's so that a few hundred images teach something in minutes
    "Cardiomegaly": 0.20,  # per patient: an enlarged heart persists across follow-ups
    "Effusion": 0.20,
    "Mass": 0.15,
    "Nodule": 0.15,
    "Pneumothorax": 0.15,
}
NIH_POSITIVES = {  # full-release positives of the findings that are labels only (of 112,120 images)
    "Atelectasis": 11559,
    "Infiltration": 19894,
    "Pneumonia": 1431,
    "Consolidation": 4667,
    "Edema": 2303,
    "Emphysema": 2516,
    "Fibrosis": 1686,
    "Pleural_Thickening": 3385,
    "Hernia": 227,
}
NIH_IMAGES = 112120
IMAGES_PER_FOLDER = 500  # NIH packs ~10,000 per archive; smaller here so the demo has several folders
TEST_FRACTION = 0.2  # of patients, as NIH's test_list (about 23%)
CSV_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)


def sample_findings(rng, has_cardiomegaly):
    """The set of findings of one image."""
    found = {name for name, p in DRAWN_PREVALENCE.items() if name != "Cardiomegaly" and rng.random() < p}
    found |= {name for name, count in NIH_POSITIVES.items() if rng.random() < count / NIH_IMAGES}
    if has_cardiomegaly:
        found.add("Cardiomegaly")
    return found


def ellipse(x, y, cx, cy, rx, ry):
    """Soft-edged ellipse mask in [0, 1] (soft edges keep the phantom free of aliasing at any size)."""
    distance = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return np.clip((1.0 - distance) * 12.0, 0.0, 1.0)


def smooth_noise(rng, size, cells):
    """Low-frequency texture in [-1, 1]: random cells upsampled bicubically."""
    coarse = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
    fine = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(fine, dtype=np.float32) / 127.5 - 1.0


def render(rng, size, anatomy, findings):
    """One phantom as uint8 [size, size] and the pixel boxes {finding: (x, y, w, h)} of its drawn lesions.

    Coordinates run over [-1, 1]; the patient's left is the image's right (a PA film), so the heart bulges right.
    """
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    x, y = np.meshgrid(axis, axis)
    image = np.full((size, size), 0.05, np.float32)
    body = ellipse(x, y, 0.0, 0.1, anatomy["body_width"], 1.05)
    image += 0.45 * body
    lung_centres = (-0.36 * anatomy["body_width"], 0.36 * anatomy["body_width"])
    lungs = [ellipse(x, y, cx, -0.08, 0.26, 0.52) for cx in lung_centres]
    lung = np.maximum(*lungs)
    image -= 0.28 * lung * (1.0 + 0.15 * smooth_noise(rng, size, 12))
    for k in range(8):  # posterior ribs: arcs across each lung
        arc = y - (-0.62 + 0.15 * k + 0.18 * x**2)
        image += 0.09 * np.clip(1 - np.abs(arc) / 0.025, 0, 1) * body
    image += 0.22 * np.clip(1 - np.abs(x) / 0.07, 0, 1) * body  # spine
    boxes = {}
    heart_radius = anatomy["heart_radius"] * (1.55 if "Cardiomegaly" in findings else 1.0)
    heart = ellipse(x, y, 0.1, 0.22, heart_radius, heart_radius * 0.85)
    image = image * (1 - heart) + 0.62 * heart
    if "Cardiomegaly" in findings:
        boxes["Cardiomegaly"] = _box(size, 0.1, 0.22, heart_radius, heart_radius * 0.85)
    if "Effusion" in findings:  # fluid fills a lung base, higher at the side wall (the meniscus)
        side = rng.integers(2)
        level = rng.uniform(0.0, 0.2) - 0.35 * np.abs(x - lung_centres[side])
        fluid = lungs[side] * np.clip((y - level) * 20, 0, 1)
        image = image * (1 - fluid) + 0.58 * fluid
        boxes["Effusion"] = _box(size, lung_centres[side], 0.22, 0.26, 0.22)
    if "Pneumothorax" in findings:  # air outside the lung at the apex-side: dark, no markings, a pleural line
        side = rng.integers(2)
        cx = lung_centres[side]
        outside = lungs[side] * (np.abs(x - cx) * 0.9 + (0.2 - y) * 0.6 > rng.uniform(0.35, 0.45))
        image = np.where(outside, 0.03, image)
        boxes["Pneumothorax"] = _box(size, cx + np.sign(cx) * 0.12, -0.35, 0.16, 0.25)
    for name, (low, high) in (("Mass", (0.11, 0.16)), ("Nodule", (0.05, 0.07))):
        if name in findings:  # a round opacity somewhere in a lung field
            radius = rng.uniform(low, high)
            cx = lung_centres[rng.integers(2)] + rng.uniform(-0.1, 0.1)
            cy = rng.uniform(-0.4, 0.15)
            image += 0.4 * ellipse(x, y, cx, cy, radius, radius)
            boxes[name] = _box(size, cx, cy, radius, radius)
    image = image * anatomy["exposure"] + rng.normal(0, 0.025, image.shape).astype(np.float32)
    pixels = Image.fromarray(np.clip(image * 255, 0, 255).astype(np.uint8))
    return np.asarray(pixels.filter(ImageFilter.GaussianBlur(size / 256))), boxes


def _box(size, cx, cy, rx, ry):
    """[-1, 1] centre and radii -> pixel (x, y, w, h)."""
    scale = (size - 1) / 2
    return (
        round((cx - rx + 1) * scale, 1),
        round((cy - ry + 1) * scale, 1),
        round(2 * rx * scale, 1),
        round(2 * ry * scale, 1),
    )


def write_demo(out, patients=400, size=128, seed=0):
    """Write the dataset; returns the number of images."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, boxes, test_patients = [], [], set()
    split_rng = np.random.default_rng([seed, 1])
    for patient_id in range(1, patients + 1):
        rng = np.random.default_rng([seed, 0, patient_id])
        anatomy = {
            "body_width": rng.uniform(0.78, 0.92),
            "heart_radius": rng.uniform(0.2, 0.24),
            "exposure": rng.uniform(0.9, 1.1),
        }
        has_cardiomegaly = rng.random() < DRAWN_PREVALENCE["Cardiomegaly"]
        follow_ups = min(1 + rng.geometric(0.4), 8)  # NIH: most patients have few films, some many
        age, sex = int(rng.integers(18, 90)), "MF"[rng.integers(2)]
        if split_rng.random() < TEST_FRACTION:
            test_patients.add(patient_id)
        for follow_up in range(follow_ups):
            name = f"{patient_id:08d}_{follow_up:03d}.png"
            findings = sample_findings(rng, has_cardiomegaly)
            exposure = anatomy["exposure"] * rng.uniform(0.95, 1.05)
            pixels, drawn = render(rng, size, {**anatomy, "exposure": exposure}, findings)
            folder = out / f"images_{len(rows) // IMAGES_PER_FOLDER + 1:03d}" / "images"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / name, compress_level=1)
            labels = "|".join(f for f in FINDINGS if f in findings) or "No Finding"
            spacing = round(0.143 * 2500 / size, 4)
            view = "PA" if rng.random() < 0.6 else "AP"
            rows.append([name, labels, follow_up, patient_id, age, sex, view, size, size, spacing, spacing])
            boxes += [[name, finding, *box] for finding, box in drawn.items()]
    _write_tables(out, rows, boxes, test_patients)
    return len(rows)


def _write_tables(out, rows, boxes, test_patients):
    with open(out / "Data_Entry_2017_v2020.csv", "w", newline="") as file:
        file.write(CSV_HEADER + "\n")
        csv.writer(file).writerows(rows)
    with open(out / "BBox_List_2017.csv", "w", newline="") as file:
        file.write("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
        csv.writer(file).writerows(boxes)
    test = [row[0] for row in rows if row[3] in test_patients]
    train_val = [row[0] for row in rows if row[3] not in test_patients]
    (out / "test_list.txt").write_text("\n".join(test) + "\n")
    (out / "train_val_list.txt").write_text("\n".join(train_val) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/demo", help="output folder (default: %(default)s)")
    parser.add_argument("--patients", type=int, default=400, help="patients (~3.4 images each; default: %(default)s)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = parser.parse_args()
    count = write_demo(args.out, args.patients, args.size, args.seed)
    print(f"wrote {count} images of {args.patients} patients ({args.size} px) to {args.out}")


if __name__ == "__main__":
    main()
