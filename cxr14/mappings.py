"""How each other dataset's labels map onto the 14 findings the NIH-trained model outputs: a reported name, the
dataset's labels that make it positive, and the model's findings whose highest probability scores it
(model_scores); with the label values each dataset uses. external.py reads the datasets with them."""

import numpy as np

from dataset import FINDINGS

UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")


UNCERTAIN_VALUES = {"ignore": np.nan, "zeros": 0, "ones": 1}  # what an uncertain label (-1) becomes under each policy


LABELER_VALUES = (1, 0, -1)  # CheXpert's labeler (CheXpert, MIMIC): positive, negative, uncertain; blank: not mentioned


VINDR_RULES = ("any", "majority")  # a VinDr finding is positive when any radiologist marked it, or at least two


CHEXPERT_MAPPING = {  # reported name: (CheXpert labeler columns, the model's findings whose maximum scores it)
    "Atelectasis": (("Atelectasis",), ("Atelectasis",)),
    "Cardiomegaly": (("Cardiomegaly",), ("Cardiomegaly",)),
    "Consolidation": (("Consolidation",), ("Consolidation",)),
    "Edema": (("Edema",), ("Edema",)),
    "Effusion": (("Pleural Effusion",), ("Effusion",)),
    "Pneumonia": (("Pneumonia",), ("Pneumonia",)),
    "Pneumothorax": (("Pneumothorax",), ("Pneumothorax",)),
    "Mass/Nodule": (("Lung Lesion",), ("Mass", "Nodule")),  # one lesion label for both of NIH's
}


PADCHEST_MAPPING = {  # reported name: (PadChest labels, as PadChest spells them, the model's findings)
    "Atelectasis": (
        (
            "atelectasis",
            "laminar atelectasis",
            "lobar atelectasis",
            "segmental atelectasis",
            "total atelectasis",
            "atelectasis basal",
            "round atelectasis",
        ),
        ("Atelectasis",),
    ),
    "Cardiomegaly": (("cardiomegaly",), ("Cardiomegaly",)),
    "Effusion": (("pleural effusion", "loculated pleural effusion", "loculated fissural effusion"), ("Effusion",)),
    "Infiltration": (("infiltrates",), ("Infiltration",)),
    "Mass": (("mass", "pulmonary mass"), ("Mass",)),
    "Nodule": (("nodule", "multiple nodules"), ("Nodule",)),
    "Pneumonia": (("pneumonia", "atypical pneumonia"), ("Pneumonia",)),
    "Pneumothorax": (("pneumothorax", "hydropneumothorax"), ("Pneumothorax",)),
    "Consolidation": (("consolidation", "air bronchogram"), ("Consolidation",)),
    "Edema": (("pulmonary edema",), ("Edema",)),
    "Emphysema": (("emphysema",), ("Emphysema",)),
    "Fibrosis": (("pulmonary fibrosis",), ("Fibrosis",)),
    "Pleural_Thickening": (
        ("pleural thickening", "apical pleural thickening", "calcified pleural thickening"),
        ("Pleural_Thickening",),
    ),
    "Hernia": (("hiatal hernia",), ("Hernia",)),
}


PADCHEST_UNCLEAR = {  # labels that may or may not be NIH's finding: such films are left out of it (NaN)
    "Infiltration": (
        "alveolar pattern",
        "interstitial pattern",
        "reticular interstitial pattern",
        "reticulonodular interstitial pattern",
        "ground glass pattern",
    ),
}


PADCHEST_EXCLUDED = "exclude"  # PadChest's own mark for films not to be used


VINDR_MAPPING = {  # reported name: (VinDr class names, the model's findings)
    "Atelectasis": (("Atelectasis",), ("Atelectasis",)),
    "Cardiomegaly": (("Cardiomegaly",), ("Cardiomegaly",)),
    "Consolidation": (("Consolidation",), ("Consolidation",)),
    "Infiltration": (("Infiltration",), ("Infiltration",)),
    "Mass/Nodule": (("Nodule/Mass",), ("Mass", "Nodule")),
    "Effusion": (("Pleural effusion",), ("Effusion",)),
    "Pleural_Thickening": (("Pleural thickening",), ("Pleural_Thickening",)),
    "Pneumothorax": (("Pneumothorax",), ("Pneumothorax",)),
    "Fibrosis": (("Pulmonary fibrosis",), ("Fibrosis",)),
}


RSNA_MAPPING = {"Pneumonia": (("Target",), ("Pneumonia",))}


OWN_CSV_MAPPING = {finding: ((finding,), (finding,)) for finding in FINDINGS}  # of these, the columns the file has


EXPERT_MAPPING = {  # Google's expert labels of NIH films: name -> the NIH findings (labels and model) behind it
    "Pneumothorax": ("Pneumothorax",),
    "Nodule or mass": ("Mass", "Nodule"),
    "Airspace opacity": ("Consolidation", "Pneumonia", "Infiltration"),
}


EXPERT_UNSCORED = ("Fracture",)  # labelled by the experts, with no NIH finding to score it


EXPERT_COLUMNS = ("Image Index", *EXPERT_UNSCORED, *EXPERT_MAPPING, "Set Id")


def model_scores(probabilities, mapping, findings):
    """[images, reported names]: each name's score is the highest probability among its mapped findings."""
    return np.stack(
        [probabilities[:, [findings.index(f) for f in mapped]].max(axis=1) for mapped in mapping.values()], axis=1
    )
