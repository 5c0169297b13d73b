"""A chest film from disk to the square the network sees: opening (PNG, JPEG, DICOM), letterboxing, the
evaluation crop, and the geometry back to the original. numpy, Pillow and (for DICOM) pydicom only, no torch:
an ONNX deployment (predict.py --onnx) runs this file without PyTorch installed.

DICOM is read as radiology stores it: pydicom's modality LUT (rescale), then the VOI LUT or window when the file
has one, then MONOCHROME1 inverted, so the film looks as a reading workstation shows it. Compressed transfer
syntaxes decode through pydicom's plugins (requirements-extras.txt). A header that says the film is not a frontal
chest radiograph gives a warning that names the value (an error with strict=True).
"""

from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from cxr14.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what the dataset indexes (NIH ships PNG)
DICOM_SUFFIXES = (".dcm", ".dicom")  # predict.py and app.py read these too
EVAL_CROP_FRACTION = 0.875  # evaluation: resize to IMAGE_SIZE / this, then centre-crop IMAGE_SIZE (the field of
# view of an average training crop)
FRONTAL_MODALITIES = ("CR", "DX")  # computed and digital radiography: what NIH's films are
FRONTAL_VIEWS = {"PA", "AP", "AP_HORIZONTAL", "FRONTAL"}  # projections of frontal films (AP_horizontal: PadChest's
# supine AP films)
PNG_BIT_DEPTHS = (8, 10, 12, 14, 16)  # a 16-bit file is scaled by the smallest of these that holds its brightest
# pixel: 12-bit films saved as 16-bit PNGs (max 4095) stay as bright as the scanner made them
LATERAL_VIEWS = {"L", "LL", "RL", "LATERAL", "LAT", "LLD", "RLD"}  # side views: DICOM ViewPosition and datasets' own
DECODER_PACKAGES = {  # transfer syntax UID prefix -> the pydicom plugin that decodes it
    "1.2.840.10008.1.2.4.5": "pylibjpeg-libjpeg",  # JPEG baseline / extended
    "1.2.840.10008.1.2.4.7": "pylibjpeg-libjpeg",  # JPEG lossless
    "1.2.840.10008.1.2.4.8": "pylibjpeg-libjpeg",  # JPEG-LS
    "1.2.840.10008.1.2.4.9": "pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.20": "pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",  # RLE lossless
}


class Prepared(NamedTuple):
    """A film ready for the network, with what is drawn and reported beside its prediction."""

    name: str
    original: np.ndarray  # uint8 [H, W], the film as opened (drawn under the heat maps)
    crop: np.ndarray  # uint8 [S, S], the evaluation crop the network sees
    warnings: tuple


class Film(NamedTuple):
    pixels: np.ndarray  # uint8 [H, W], 8-bit grayscale as displayed
    warnings: tuple  # why this file may not be what the model was trained on (DICOM header checks)


def open_film(path, strict=False, file=None):
    """A PNG, JPEG or DICOM file as 8-bit grayscale, with the header's warnings (errors when strict). With `file`
    (an open binary file: a member of an archive being read) the pixels come from it and `path` names it."""
    path = Path(path)
    try:
        if path.suffix.lower() in DICOM_SUFFIXES:
            return _open_dicom(path, strict)
        with Image.open(path if file is None else file) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)  # a JPEG's EXIF orientation, applied as every viewer does
            return Film(_to_gray8(upright), ())
    except DataError:
        raise
    except Image.DecompressionBombError as error:
        raise DataError(
            f"{path} is not a chest film: {error} (a chest film has at most about 20 million pixels). Remove it "
            "from the images folder."
        ) from error
    except Exception as error:  # decoders raise many kinds (OSError, ValueError, SyntaxError, pydicom's own)
        raise DataError(f"cannot read image {path}: {error}. Re-extract or re-download this file.") from error


def _to_gray8(image):
    """16-bit images are scaled by the bit depth their pixels use (PNG_BIT_DEPTHS), rather than clipped or divided
    by 257; RGB/RGBA files (NIH has a few) drop colour and alpha."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float32)
        brightest = float(pixels.max(initial=0))
        bits = next((bits for bits in PNG_BIT_DEPTHS if brightest < 2**bits), PNG_BIT_DEPTHS[-1])
        return np.clip(np.round(pixels * (255.0 / (2**bits - 1))), 0, 255).astype(np.uint8)
    return np.array(image if image.mode == "L" else image.convert("L"), dtype=np.uint8)


def load_image(path, size=None, file=None):
    """8-bit grayscale uint8 [H, W], letterboxed to size x size when size is given: what training reads (from
    `file`, an open binary file that `path` names, when given)."""
    pixels = open_film(path, file=file).pixels
    return pixels if size is None else np.array(fit_square(Image.fromarray(pixels), size))  # writable, for torch


def fit_square(image, size):
    """Resize the longer side to `size` and pad to a square: the whole chest stays in view (a centre crop of a
    portrait film would cut the apices or the costophrenic angles). Used by the PNG path and the cache alike."""
    width, height, left, top = _letterbox(image.size, size)
    resized = image.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if (width, height) == (size, size):
        return resized
    square = Image.new("L", (size, size), 0)
    square.paste(resized, (left, top))
    return square


def _letterbox(original_size, size):
    """(width, height, left, top) of the resized film inside the size x size square."""
    scale = size / max(original_size)
    width, height = (max(1, round(side * scale)) for side in original_size)
    return width, height, (size - width) // 2, (size - height) // 2


# ----------------------------------------------------------------------------- the evaluation crop


def prepare(path, load_size, image_size, strict=False):
    """A film as the network sees it: opened (DICOM windowed), letterboxed to load_size, the evaluation crop.
    The one preprocessing of predict.py (PyTorch and ONNX), the web page and the localisation report."""
    film = open_film(path, strict)
    loaded = np.asarray(fit_square(Image.fromarray(film.pixels), load_size))
    return Prepared(str(path), film.pixels, eval_crop(loaded, image_size), film.warnings)


def eval_crop(pixels, image_size):
    """The deterministic view the network evaluates: uint8 [L, L] -> uint8 [S, S], resized to
    image_size / EVAL_CROP_FRACTION (no resampling when that is L, as with 224 of 256), then centre-cropped."""
    resized, top = _eval_resize(image_size)
    image = _resize(pixels, resized)
    return np.array(image[top : top + image_size, top : top + image_size])  # a writable copy for torch


def five_views(pixels, image_size):
    """Test-time augmentation: the four corner crops and the centre crop, uint8 [5, S, S]. No flips: the model never
    saw a mirrored chest."""
    resized, top = _eval_resize(image_size)
    image, far = _resize(pixels, resized), resized - image_size
    corners = [(0, 0), (0, far), (far, 0), (far, far), (top, top)]
    return np.stack([image[y : y + image_size, x : x + image_size] for y, x in corners])


def _eval_resize(image_size):
    resized = round(image_size / EVAL_CROP_FRACTION)
    return resized, int(round((resized - image_size) / 2))


def _resize(pixels, side):
    if pixels.shape == (side, side):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((side, side), Image.Resampling.BILINEAR))


def crop_to_original(original_size, load_size, image_size):
    """(scale_x, offset_x, scale_y, offset_y): a point x of the evaluation crop is at scale_x * x + offset_x in
    the original film (pixel edges as coordinates), and likewise for y. It undoes the centre crop, the resize
    and the letterbox, so heat maps and boxes can be drawn on, or compared in, the original's pixels."""
    resized, top = _eval_resize(image_size)
    width, height, left, pad_top = _letterbox(original_size, load_size)
    per_crop_pixel = load_size / resized  # loaded pixels per crop pixel
    scale_x, scale_y = original_size[0] / width, original_size[1] / height
    return (
        per_crop_pixel * scale_x,
        (top * per_crop_pixel - left) * scale_x,
        per_crop_pixel * scale_y,
        (top * per_crop_pixel - pad_top) * scale_y,
    )


# ----------------------------------------------------------------------------- DICOM


def _open_dicom(path, strict):
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as error:
        raise DataError(f"{path} is DICOM: install pydicom (pip install -r requirements-extras.txt)") from error
    try:
        dataset = pydicom.dcmread(path)
    except InvalidDicomError as error:
        raise DataError(
            f"{path} is not a DICOM file (no 'DICM' marker in its first 132 bytes): another kind of file named "
            f"{path.suffix}. Export the film from the PACS as DICOM, or give it as PNG/JPEG."
        ) from error
    _refuse_unusable(dataset, path)
    warnings = header_warnings(dataset)
    if strict and warnings:
        raise DataError(f"{path}: {'; '.join(warnings)} (--strict refuses such files)")
    values = apply_modality_lut(_decoded_pixels(dataset, path), dataset)
    windowed = apply_voi_lut(values, dataset)
    if windowed is values:  # no VOI LUT or window in the file: the film's own range
        low, high = float(values.min()), float(values.max())
    else:
        low, high = _voi_output_range(dataset, apply_voi_lut)
    pixels = (windowed.astype(np.float64) - low) / ((high - low) or 1.0) * 255
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":  # bright air: invert to a radiograph's look
        pixels = 255 - pixels
    return Film(np.clip(np.round(pixels), 0, 255).astype(np.uint8), tuple(warnings))


def _voi_output_range(dataset, apply_voi_lut):
    """(low, high): what the VOI transform gives for its lowest and highest inputs (the LUT's first and last
    entries, or the window's output range), mapped to black and white."""
    lut = dataset.get("VOILUTSequence")
    if lut and lut[0].get("LUTData") is not None:
        entries, first, _ = lut[0].LUTDescriptor
        inputs = np.array([first, first + (entries or 2**16) - 1], dtype=np.int64)
    else:
        inputs = np.array([-1e12, 1e12])
    low, high = apply_voi_lut(inputs, dataset).astype(np.float64)
    return low, high


def _refuse_unusable(dataset, path):
    if "PixelData" not in dataset:
        raise DataError(f"{path} holds no image (a DICOM {dataset.get('Modality', 'object')} without pixel data).")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"{path} is a multi-frame DICOM ({frames} frames); give one frontal chest film per file.")
    if int(dataset.get("SamplesPerPixel", 1)) != 1:
        colour = dataset.get("PhotometricInterpretation", "colour")
        raise DataError(f"{path} is a colour ({colour}) DICOM; chest radiographs are grayscale (MONOCHROME1/2).")


def header_warnings(dataset):
    """Why a DICOM header says this is not a frontal chest radiograph, naming the values (empty when it is)."""
    warnings = []
    body_part = str(dataset.get("BodyPartExamined", "") or "").strip().upper()
    if body_part and body_part != "CHEST":
        warnings.append(f"BodyPartExamined is {body_part!r}, not CHEST")
    view = str(dataset.get("ViewPosition", "") or "").strip().upper()
    if view in LATERAL_VIEWS:
        warnings.append(f"ViewPosition is {view!r}: a lateral film; the model was trained on frontal (PA/AP) films")
    modality = str(dataset.get("Modality", "") or "").strip().upper()
    if modality and modality not in FRONTAL_MODALITIES:
        warnings.append(f"Modality is {modality!r}, not a radiograph (CR/DX)")
    return warnings


def _decoded_pixels(dataset, path):
    syntax = dataset.file_meta.get("TransferSyntaxUID", "") if hasattr(dataset, "file_meta") else ""
    try:
        return dataset.pixel_array
    except Exception as error:
        package = next((name for prefix, name in DECODER_PACKAGES.items() if str(syntax).startswith(prefix)), None)
        if package is None:
            raise
        name = getattr(syntax, "name", syntax)
        raise DataError(
            f"{path} is compressed as {name} ({syntax}), and no installed decoder reads it: "
            f"pip install {package} (or pip install -r requirements-extras.txt). ({error})"
        ) from error
