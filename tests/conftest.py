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
    """A larger demo dataset for the tests that train a model and expect it to learn."""
    out = tmp_path_factory.mktemp("learn")
    write_demo(out, patients=300, size=64, seed=2)
    return out


def validation_loss_of(checkpoint_path, data_dir, split_path):
    """The weighted BCE of a checkpoint over a run's validation images, computed in one process."""
    import json

    import torch
    import torch.nn.functional as F

    from dataset import FINDINGS, ChestXrayDataset, PngImages, attach_image_paths, read_labels, read_split
    from model import load_checkpoint, model_from_checkpoint, predict_logits
    from transforms import eval_transform, prepare_batch

    checkpoint = load_checkpoint(checkpoint_path, FINDINGS)
    config = checkpoint["config"]
    labels = attach_image_paths(read_labels(Path(data_dir) / "Data_Entry_2017_v2020.csv"), data_dir)
    split = read_split(split_path)
    rows = labels.set_index("image_name").loc[split.image_name[split.split == "val"]]
    images = PngImages(rows["path"], config["LOAD_SIZE"])
    dataset = ChestXrayDataset(images, rows[list(FINDINGS)], eval_transform(config["IMAGE_SIZE"]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=32)
    logits, targets = predict_logits(model_from_checkpoint(checkpoint), loader, lambda x: prepare_batch(x, "cpu"))
    pos_weight = json.loads((Path(checkpoint_path).parent / "pos_weight.json").read_text())
    weight = torch.tensor([pos_weight[finding] for finding in FINDINGS])
    return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight).item()
