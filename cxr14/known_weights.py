"""Published pretrained weights whose pretraining data this project knows, recognised by their file's published name
(or Hugging Face Hub id) in PRETRAINED. Some saw NIH films of the official test list; a run started from them scores
its NIH test films as films its weights had seen, and evaluate.py says so (scoring.pretrained_saw_test)."""

from pathlib import PurePath
from typing import NamedTuple

RANDOM_NIH_SPLIT = (
    "torchxrayvision trained on NIH's films split at random, not by NIH's official lists, so its training films "
    "include official test films (torchxrayvision issue #47)"
)


class Known(NamedTuple):
    title: str
    names: tuple  # lower-case parts of the published file name or hub id that identify it
    data: str  # what it was pretrained on
    saw_nih_test: str  # why its pretraining saw films of NIH's official test list; "" when it did not
    source: str  # where it is published, and its license


KNOWN_WEIGHTS = (  # the first that matches is taken: torchxrayvision's `all` file names hold its `rsna` one's
    Known(
        "torchxrayvision densenet121-res224-all",
        ("nih-pc-chex-mimic_ch-google-openi-kaggle",),
        "NIH, PadChest, CheXpert, MIMIC-CXR, Google's NIH labels, OpenI, RSNA pneumonia (NIH films)",
        RANDOM_NIH_SPLIT,
        "github.com/mlmed/torchxrayvision releases, Apache-2.0",
    ),
    Known(
        "torchxrayvision resnet50-res512-all",
        ("pc-nih-rsna-siim-vin-resnet50",),
        "PadChest, NIH, RSNA pneumonia (NIH films), SIIM pneumothorax, VinDr-CXR",
        RANDOM_NIH_SPLIT,
        "github.com/mlmed/torchxrayvision releases, Apache-2.0",
    ),
    Known(
        "torchxrayvision densenet121-res224-nih",
        ("nih-densenet121-d121",),
        "NIH",
        RANDOM_NIH_SPLIT,
        "github.com/mlmed/torchxrayvision releases, Apache-2.0",
    ),
    Known(
        "torchxrayvision densenet121-res224-rsna",
        ("kaggle-densenet121-d121",),
        "RSNA pneumonia challenge (NIH films)",
        "RSNA's films are NIH films, and " + RANDOM_NIH_SPLIT,
        "github.com/mlmed/torchxrayvision releases, Apache-2.0",
    ),
    Known(
        "RAD-DINO",
        ("rad-dino", "rad_dino"),
        "MIMIC-CXR, CheXpert, NIH (all 112,120 films), PadChest, BRAX",
        "RAD-DINO was pretrained on all 112,120 NIH films, the official test list's included",
        "huggingface.co/microsoft/rad-dino, MSRLA license (research use)",
    ),
    Known(
        "EVA-X",
        ("eva_x_",),
        "NIH's official training films, CheXpert, MIMIC-CXR (520k films; NIH's test list left out)",
        "",
        "huggingface.co/MapleF/eva_x (hustvl/EVA-X), MIT license",
    ),
    Known(
        "MGCA ResNet-50",
        ("mgca",),
        "MIMIC-CXR films and their reports (no NIH film)",
        "",
        "github.com/HKU-MedAI/MGCA (a Google Drive folder linked from its front page; no license named there)",
    ),
)


def known_weights(pretrained):
    """The Known entry of a PRETRAINED value (a file path or hf-hub:ORG/NAME), or None: matched on the file's name, or
    on the hub id."""
    text = str(pretrained).lower()
    name = text if text.startswith("hf-hub:") else PurePath(text.replace("\\", "/")).name
    return next((known for known in KNOWN_WEIGHTS if any(part in name for part in known.names)), None)
