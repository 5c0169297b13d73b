# CheXNet's recipe (Rajpurkar et al. 2017, "CheXNet: Radiologist-Level Pneumonia Detection on Chest X-Rays with Deep
# Learning", section 3): an ImageNet DenseNet-121 trained end to end with Adam (standard parameters) at 1e-3 in
# minibatches of 16 at 224 x 224 px, the learning rate cut 10x each time the validation loss plateaus after an
# epoch, and the epoch of lowest validation loss kept (best.pth); a class-weighted binary cross-entropy, which
# POS_WEIGHT = "ratio" equals up to a scale. Departures: no random horizontal flip (train.py never mirrors a chest),
# 224-px crops of 256-px films rather than whole films resized to 224, AdamW without weight decay (that is Adam),
# and the paper's random 70/10/20 patient split only where NIH's official lists are absent. CheXNet gives no number
# of epochs: early stopping ends the run.
# Use: python train.py config/chexnet.py
#
# Published by CheXNet's authors (not measured here): mean AUROC 0.841 over the 14 findings, on their random patient
# split (not NIH's official one, on which published DenseNet-121 figures are lower, about 0.82).
BACKBONE = "densenet121"
DATA_DIR = "data/nih"
OUT_DIR = "checkpoints/chexnet"
PRETRAINED = "imagenet"
TRAINABLE_LAYERS = "all"
IMAGE_SIZE = 224
LOAD_SIZE = 256
BATCH_SIZE = 16
EPOCHS = 50
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.0
LR_SCHEDULE = "plateau"
LR_FACTOR = 0.1
LR_PATIENCE = 0
EARLY_STOPPING_PATIENCE = 3
POS_WEIGHT = "ratio"
