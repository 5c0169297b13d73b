import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo_data import write_demo  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SAMPLE_CSV = FIXTURES / "Data_Entry_2017_sample.csv"  # 503 real rows of NIH's Data_Entry_2017_v2020.csv


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A small synthetic NIH-layout dataset shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("demo")
    write_demo(out, patients=60, size=64, seed=1)
    return out


@pytest.fixture(scope="session")
def learn_dir(tmp_path_factory):
    """A larger demo dataset (a data seed the demo's settings were not tuned on) for the tests that train a model
    and expect it to learn."""
    out = tmp_path_factory.mktemp("learn")
    write_demo(out, patients=300, size=128, seed=2)
    return out


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
    }
    settings.update(changes)
    return [f"--{name}={value}" for name, value in settings.items()]


def predict_split(checkpoint_path, data_dir, part, amp=True):
    """Logits and targets of a checkpoint over one part of a run's saved split (split.csv beside the checkpoint),
    computed as evaluate.py does (batches of 64, AMP and channels_last where the device has them)."""
    from functools import partial

    import torch

    from dataset import FINDINGS, run_split, split_rows
    from films import eval_view
    from images import PngImages
    from inference import TorchModel, predict_logits
    from loaders import ChestXrayDataset
    from transforms import normalize

    model = TorchModel(checkpoint_path, device="cpu", amp=amp)
    rows = split_rows(*run_split(model.checkpoint, checkpoint_path), data_dir, "", [part])[0][part]
    images = PngImages(rows["path"], model.load_size)
    dataset = ChestXrayDataset(images, rows[list(FINDINGS)], partial(eval_view, image_size=model.image_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    return predict_logits(model.net, loader, lambda batch: normalize(batch, model.channels_last), model.dtype)


def validation_loss_of(checkpoint_path, data_dir, amp=True):
    """The weighted BCE of a checkpoint over a run's validation images, computed in one process."""
    import json

    import torch
    import torch.nn.functional as F

    from dataset import FINDINGS

    logits, targets = predict_split(checkpoint_path, data_dir, "val", amp)
    pos_weight = json.loads((Path(checkpoint_path).parent / "pos_weight.json").read_text())
    weight = torch.tensor([pos_weight[finding] for finding in FINDINGS])
    return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight).item()


@pytest.fixture(scope="session")
def trained_run(learn_dir, tmp_path_factory):
    """The demo's own settings (config/demo.py) on a smaller, fresh demo dataset: about a minute on 2 cores.
    Shared by the tests that need a trained model."""
    import train

    out = tmp_path_factory.mktemp("trained")
    argv = [str(ROOT / "config" / "demo.py"), f"--data_dir={learn_dir}", f"--out_dir={out}", "--device=cpu"]
    with pytest.raises(SystemExit) as stopped:
        train.main(argv)
    assert stopped.value.code == 0
    return out


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
