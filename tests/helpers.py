"""What tests import: paths, train.py settings for a run of seconds, a checkpoint's outputs computed independently,
and a DICOM writer. (The shared datasets and trained run are conftest.py's fixtures.)"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SAMPLE_CSV = FIXTURES / "Data_Entry_2017_sample.csv"  # 503 real rows of NIH's Data_Entry_2017_v2020.csv


def run(argv):
    """train.main's exit code (or its one-line message)."""
    import pytest

    import train

    with pytest.raises(SystemExit) as stopped:
        train.main(argv)
    return stopped.value.code


def weights(path):
    """A checkpoint's model weights."""
    from cxr14.checkpoints import load_checkpoint
    from dataset import FINDINGS

    return load_checkpoint(path, FINDINGS)["model"]


def assert_same_weights(first, second):
    """Two state dicts equal to float rounding (a resumed run against an uninterrupted one)."""
    import torch

    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-5, atol=1e-6, msg=name)


def tiny_settings(data_dir, out_dir, **changes):
    """train.py settings for a run of a few seconds on the CPU, as --name=value arguments."""
    settings = {
        "data_dir": data_dir,
        "out_dir": out_dir,
        "image_size": 32,
        "load_size": 40,
        "batch_size": 16,
        "epochs": 2,
        "learning_rate": 1e-3,
        "pretrained": "none",
        "num_workers": 0,
        "device": "cpu",
        "early_stopping_patience": 0,
        "tensorboard": "false",  # its events and heat maps cost a second a run; the TensorBoard test asks for them
    }
    settings.update(changes)
    return [f"--{name}={value}" for name, value in settings.items()]


def predict_split(checkpoint_path, data_dir, part, amp=True):
    """Logits and targets of a checkpoint over one part of a run's saved split (split.csv beside the checkpoint),
    computed as evaluate.py does (batches of 64, AMP and channels_last where the device has them)."""
    from functools import partial

    import torch

    from cxr14.films import eval_crop
    from cxr14.inference import TorchModel, predict_logits
    from cxr14.loaders import ChestXrayDataset
    from cxr14.pixels import FilmImages
    from dataset import FINDINGS, run_split, split_rows
    from transforms import normalize

    model = TorchModel(checkpoint_path, device="cpu", amp=amp)
    rows = split_rows(*run_split(model.checkpoint, checkpoint_path), data_dir, "", [part])[0][part]
    images = FilmImages(rows["path"], model.load_size)
    dataset = ChestXrayDataset(images, rows[list(FINDINGS)], partial(eval_crop, image_size=model.image_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    return predict_logits(model.net, loader, lambda batch: normalize(batch, model.channels_last), model.dtype)


def validation_loss_of(checkpoint_path, data_dir, amp=True):
    """The weighted BCE of a checkpoint over a run's validation images, computed in one process."""
    import json

    import torch
    import torch.nn.functional as F

    from dataset import FINDINGS

    logits, targets = predict_split(checkpoint_path, data_dir, "val", amp)
    pos_weight = json.loads((Path(checkpoint_path).parent / "pos_weight.json").read_text(encoding="utf-8"))
    weight = torch.tensor([pos_weight[finding] for finding in FINDINGS])
    return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight).item()


def write_dicom(path, pixels, compress=None, **header):
    """A single-frame grayscale DICOM the way a DX modality writes one: uint16 pixels, then the header's elements
    (Modality, BodyPartExamined, ViewPosition, WindowCenter, RescaleSlope, ... given by keyword), optionally
    compressed with pydicom's encoders (RLE lossless natively, JPEG 2000 lossless through pylibjpeg-openjpeg)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality, dataset.BodyPartExamined, dataset.ViewPosition = "DX", "CHEST", "PA"
    dataset.Rows, dataset.Columns = pixels.shape[-2:]
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    for keyword, value in header.items():
        setattr(dataset, keyword, value)
    dataset.PixelData = pixels.astype(np.uint16).tobytes()
    if compress is not None:
        dataset.compress(compress)
    dataset.save_as(path, enforce_file_format=True)
    return path
