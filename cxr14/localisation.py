"""Do the heat maps point at the disease? Grad-CAM against radiologists' boxes, as Wang et al. 2017 (the
ChestX-ray14 paper) scored it on NIH's 984 boxes in BBox_List_2017.csv.

For each boxed film of the evaluated split and each of its boxed findings: the finding's Grad-CAM map (the same
preprocessing and heat map as predict.py), turned into boxes as Wang et al. did (the map thresholded at a share of its
maximum, one box around each connected region), in the original film's pixels (letterbox and crop undone). A box is
found at T(IoBB) when a predicted box's intersection with it covers more than T of the predicted box, and at T(IoU)
likewise for intersection over union; the pointing game asks whether the map's peak lies inside the box.
"""

import warnings
from collections import defaultdict

import numpy as np
import torch
from tqdm import tqdm

from cxr14.errors import DataError
from cxr14.films import crop_to_original, prepare
from cxr14.heat_maps import COLORMAP, HEAT_ALPHA, finding_masks, map_on_film
from cxr14.inference import crop_outputs
from dataset import FINDINGS, read_table
from model import cam_weights

IOBB_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)  # Wang et al.'s T(IoBB)
IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)  # and T(IoU)
BOX_THRESHOLD = 0.7  # the map is cut at this share of its maximum (about Wang et al.'s 180 of 255)
OFF_FILM_TOLERANCE = 0.1  # a box off the film by at most this share of its width or height is clipped to the film (a
# margin or a rounding); one further off is left out, counted and named
NIH_SPELLING = {"Infiltrate": "Infiltration"}  # BBox_List_2017.csv's name for a finding, and ours
WANG_IOBB_01 = {  # Wang et al. 2017, Table 3 (ResNet-50): localisation accuracy at T(IoBB) = 0.1
    "Atelectasis": 0.7277,
    "Cardiomegaly": 0.9931,
    "Effusion": 0.7124,
    "Infiltration": 0.7886,
    "Mass": 0.4352,
    "Nodule": 0.1645,
    "Pneumonia": 0.7500,
    "Pneumothorax": 0.4591,
}
EXAMPLES = 8  # films drawn in localisation.png
BATCH_FILMS = 32  # films whose maps one forward pass draws (one at a time took 78 s for NIH's 166 boxed test films)


def read_boxes(path):
    """NIH's BBox_List_2017.csv: image_name, finding (our spelling), x, y, w, h in the original film's pixels."""
    table = read_table(path, header=None, skiprows=1, usecols=range(6), dtype={0: str, 1: str})
    table.columns = ["image_name", "finding", "x", "y", "w", "h"]
    table["finding"] = table.finding.str.strip().replace(NIH_SPELLING)
    unknown = sorted(set(table.finding) - set(FINDINGS))
    if unknown:
        raise DataError(f"{path}: unknown finding(s) {unknown}; the file should be NIH's BBox_List_2017.csv")
    if table[["x", "y", "w", "h"]].isna().any().any():
        row = int(np.flatnonzero(table[["x", "y", "w", "h"]].isna().any(axis=1))[0])
        raise DataError(f"{path}, row {row + 2}: a box needs four numbers x, y, w, h")
    return usable_boxes(table, path)


def usable_boxes(boxes, source):
    """The boxes (x, y, w, h columns) of positive width and height: a swapped, zero-area or incomplete box measures
    nothing (with every box swapped, every figure was 0.000), so it is left out, counted and named."""
    sizes = boxes[["w", "h"]].astype(float)
    bad = ~((sizes.w > 0) & (sizes.h > 0)).to_numpy() | boxes[["x", "y"]].isna().any(axis=1).to_numpy()
    if bad.any():
        first = "; ".join(
            f"{box.image_name} x={box.x} y={box.y} w={box.w} h={box.h}" for box in boxes[bad].head(3).itertuples()
        )
        warnings.warn(
            f"{source}: {bad.sum()} box(es) without a positive width and height (swapped corners?) left out "
            f"(first: {first})",
            stacklevel=2,
        )
    return boxes[~bad].reset_index(drop=True)


def on_film(box, width, height, tolerance=OFF_FILM_TOLERANCE):
    """(x0, y0, x1, y1) clipped to a film of width x height pixels, or None when more than `tolerance` of its width
    or height lies off the film."""
    x0, y0, x1, y1 = box
    clipped = (max(x0, 0), max(y0, 0), min(x1, width), min(y1, height))
    lost_x = 1 - (clipped[2] - clipped[0]) / (x1 - x0)
    lost_y = 1 - (clipped[3] - clipped[1]) / (y1 - y0)
    return clipped if max(lost_x, lost_y) <= tolerance else None


def boxes_from_map(mask, threshold=BOX_THRESHOLD):
    """(x0, y0, x1, y1) boxes in crop pixels around each connected region of the map at or above threshold x its
    maximum; none for an empty map."""
    from scipy import ndimage

    if mask.max() <= 0:
        return []
    regions, _ = ndimage.label(mask >= threshold * mask.max())
    return [(box[1].start, box[0].start, box[1].stop, box[0].stop) for box in ndimage.find_objects(regions)]


def peak(mask):
    """(x, y) in crop pixels of the centre of the map's highest plateau (upsampled layer4 cells are flat)."""
    ys, xs = np.nonzero(mask >= mask.max() - 0.01)
    return xs.mean() + 0.5, ys.mean() + 0.5


def to_original(box, geometry):
    """A crop box (x0, y0, x1, y1) in the original film's pixels (films.crop_to_original's geometry)."""
    scale_x, offset_x, scale_y, offset_y = geometry
    return (
        box[0] * scale_x + offset_x,
        box[1] * scale_y + offset_y,
        box[2] * scale_x + offset_x,
        box[3] * scale_y + offset_y,
    )


def overlaps(truth, predicted):
    """(IoU, IoBB) of a true box with a predicted box, both (x0, y0, x1, y1): IoBB is the intersection over the
    predicted box's area (Wang et al.)."""
    width = max(0.0, min(truth[2], predicted[2]) - max(truth[0], predicted[0]))
    height = max(0.0, min(truth[3], predicted[3]) - max(truth[1], predicted[1]))
    intersection = width * height
    union = _area(truth) + _area(predicted) - intersection
    return intersection / union if union else 0.0, intersection / _area(predicted) if _area(predicted) else 0.0


def _area(box):
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def accuracy(records):
    """{boxes, iobb: {T: share found}, iou: {T: share found}, pointing: share} over (truth, predicted, peak)."""
    best = np.array([[max((overlaps(t, p)[k] for p in boxes), default=0.0) for k in (0, 1)] for t, boxes, _ in records])
    inside = [t[0] <= x <= t[2] and t[1] <= y <= t[3] for t, _, (x, y) in records]
    return {
        "boxes": len(records),
        "iobb": {str(t): float(np.mean(best[:, 1] > t)) for t in IOBB_THRESHOLDS},
        "iou": {str(t): float(np.mean(best[:, 0] > t)) for t in IOU_THRESHOLDS},
        "pointing": float(np.mean(inside)),
    }


def localise(model, boxes, rows, threshold=BOX_THRESHOLD):
    """({finding: accuracy(...)}, examples for localisation.png, boxed films outside the evaluated rows, {"clipped":
    boxes clipped to their film, "off_film": boxes left out as off their film, "first_off_film": the first few}), for
    an inference.TorchModel. The films are read and their maps drawn BATCH_FILMS at a time."""
    paths = dict(zip(rows.image_name, rows.path))
    outside = int((~boxes.image_name.isin(paths)).sum())
    boxes = boxes[boxes.image_name.isin(paths)]
    records, examples, corrected = defaultdict(list), [], {"clipped": 0, "off_film": 0, "first_off_film": []}
    if "name" not in boxes:  # what the results are reported under: the finding, or another dataset's own name
        boxes = boxes.assign(name=boxes.finding)
    groups = list(boxes.groupby("image_name", sort=True))
    with tqdm(total=len(groups), desc="localisation", unit="film") as bar:
        for start in range(0, len(groups), BATCH_FILMS):
            chunk = groups[start : start + BATCH_FILMS]
            films = [prepare(paths[image_name], model.load_size, model.image_size) for image_name, _ in chunk]
            wanted = [[FINDINGS.index(finding) for finding in group.finding] for _, group in chunk]
            for (image_name, group), film, masks in zip(chunk, films, film_masks(model, films, wanted)):
                geometry = crop_to_original(film.original.shape[::-1], model.load_size, model.image_size)
                for box, mask in zip(group.itertuples(), masks):
                    found = _box_found(image_name, box, mask, film, geometry, threshold, corrected)
                    if found is None:
                        continue
                    records[box.name].append(found)
                    if len(examples) < EXAMPLES and sum(example[1] == box.name for example in examples) < 2:
                        examples.append((film, box.name, mask, geometry, found[0], found[1]))
            bar.update(len(chunk))
    order = sorted(records, key=lambda name: FINDINGS.index(name) if name in FINDINGS else len(FINDINGS))
    return {name: accuracy(records[name]) for name in order}, examples, outside, corrected


def film_masks(model, films, wanted):
    """Each film's masks of its wanted findings (heat_maps.finding_masks), the class activation maps of all the films
    from one batched forward pass where the backbone has them in closed form (fp32, as for one film)."""
    crops = np.stack([film.crop for film in films])
    maps = None
    if cam_weights(model.net) is not None:
        maps = crop_outputs(model.net, crops, torch.device(model.device), maps=True)[2]
    return [
        finding_masks(model.net, crop[None], indices, model.device, None if maps is None else maps[k])
        for k, (crop, indices) in enumerate(zip(crops, wanted))
    ]


def _box_found(image_name, box, mask, film, geometry, threshold, corrected):
    """(the true box, the boxes cut from the mask, the mask's peak) in the film's pixels; None for a box off the film
    (counted in `corrected`, as are boxes clipped to it)."""
    given = (box.x, box.y, box.x + box.w, box.y + box.h)
    truth = on_film(given, *film.original.shape[::-1])
    if truth is None:
        corrected["off_film"] += 1
        if len(corrected["first_off_film"]) < 3:
            corrected["first_off_film"].append(f"{image_name} {box.name} {given}")
        return None
    corrected["clipped"] += truth != given
    predicted = [to_original(found, geometry) for found in boxes_from_map(mask, threshold)]
    x, y = peak(mask) if mask.max() > 0 else (-1.0, -1.0)
    return truth, predicted, to_original((x, y, x, y), geometry)[:2]


def format_localisation(results, reference=WANG_IOBB_01):
    header = "".join(f"{f'IoBB>{t}':>10}" for t in IOBB_THRESHOLDS) + "".join(
        f"{f'IoU>{t}':>9}" for t in (0.1, 0.3, 0.5)
    )
    lines = [f"{'finding':<20}{'boxes':>6}{header}{'pointing':>10}{'Wang IoBB>0.1' if reference else '':>15}"]
    for finding, result in results.items():
        values = "".join(f"{result['iobb'][str(t)]:>10.3f}" for t in IOBB_THRESHOLDS)
        values += "".join(f"{result['iou'][str(t)]:>9.3f}" for t in (0.1, 0.3, 0.5))
        published = f"{reference[finding]:>15.3f}" if finding in reference else f"{'':>15}"
        lines.append(f"{finding:<20}{result['boxes']:>6}{values}{result['pointing']:>10.3f}{published}")
    return "\n".join(lines)


def plot_examples(examples, path):
    """localisation.png: films under their map, with the true box (green), the boxes from the map (red, dashed) and
    the map's peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    columns = min(4, max(1, len(examples)))
    rows = -(-max(1, len(examples)) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.5 * rows), squeeze=False)
    for panel, (film, finding, mask, geometry, truth, predicted) in zip(axes.flat, examples):
        size = film.original.shape[::-1]
        heat = np.clip(map_on_film(mask, size, size, geometry), 0, 1)
        panel.imshow(film.original, cmap="gray", vmin=0, vmax=255)
        panel.imshow(heat, cmap=COLORMAP, alpha=HEAT_ALPHA * heat, vmin=0, vmax=1)
        for box, colour, style in [(truth, "lime", "-")] + [(box, "red", "--") for box in predicted]:
            x0, y0, x1, y1 = box
            panel.add_patch(
                Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour, linewidth=2, linestyle=style)
            )
        panel.set_title(f"{finding}: {str(film.name).replace(chr(92), '/').split('/')[-1]}", fontsize=10)
        panel.axis("off")
    for panel in axes.flat[len(examples) :]:
        panel.axis("off")
    figure.suptitle("green: radiologist's box; red dashed: boxes cut from the Grad-CAM map", fontsize=12)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
