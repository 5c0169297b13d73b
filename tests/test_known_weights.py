import torch

import evaluate
from cxr14.checkpoints import save_checkpoint
from cxr14.known_weights import KNOWN_WEIGHTS, known_weights

XRV_ALL = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"


def test_published_weights_are_recognised_by_their_names_and_only_those_that_saw_nihs_test_films_say_so():
    """torchxrayvision's file names as its model_urls give them, RAD-DINO's hub id, EVA-X's .pt names; the `all`
    file's name holds the `rsna` one's, and is told apart from it."""
    cases = {
        f"/home/me/.torchxrayvision/models_data/{XRV_ALL}": ("torchxrayvision densenet121-res224-all", True),
        r"C:\weights\kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt": (
            "torchxrayvision densenet121-res224-rsna",
            True,
        ),
        "nih-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt": ("torchxrayvision densenet121-res224-nih", True),
        "hf-hub:microsoft/rad-dino": ("RAD-DINO", True),
        "weights/eva_x_small_patch16_merged520k_mim.pt": ("EVA-X", False),
        "imagenet": None,
        "/data/nih-pc/my_own_weights.pth": None,  # a folder's name is not the file's
    }
    for pretrained, expected in cases.items():
        known = known_weights(pretrained)
        assert (None if known is None else (known.title, bool(known.saw_nih_test))) == expected, pretrained
    assert all(known.source and known.data for known in KNOWN_WEIGHTS)


def test_evaluate_says_at_the_top_and_in_report_json_when_the_start_had_seen_the_test_films(
    trained_run, tmp_path, capsys
):
    checkpoint = torch.load(trained_run / "best.pth", map_location="cpu", weights_only=True)
    checkpoint["config"]["PRETRAINED"] = f"/home/me/.torchxrayvision/models_data/{XRV_ALL}"
    save_checkpoint(checkpoint, tmp_path / "from_xrv.pth")
    arguments = ["--checkpoint", str(tmp_path / "from_xrv.pth"), "--bootstrap", "20", "--num_workers", "0"]
    report = evaluate.evaluate(evaluate.parse_args([*arguments, "--boxes", "none"]))
    said = report["pretrained_saw_test_films"]
    assert "torchxrayvision densenet121-res224-all" in said and "issue #47" in said
    printed = capsys.readouterr().out.splitlines()
    first = printed.index(f"PRETRAINED SAW THE TEST FILMS: {said}")  # the report's first line, above its checkpoint's
    assert printed[first + 1].startswith(f"checkpoint {tmp_path / 'from_xrv.pth'}"), printed[first : first + 2]
