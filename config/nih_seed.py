# The seed recipe: train.py's own defaults, written out (this file changes nothing; it documents them).
# An ImageNet ResNet-50 with stem..layer3 frozen (FrozenBatchNorm2d included): layer4 and the head train, AdamW at a
# fine-tuning rate, ReduceLROnPlateau on validation loss, early stopping, 224 px crops of 256 px films.
# Use: python train.py config/nih_seed.py            (the data in data/nih, see docs/data.md, "Getting the data")
#
# Expected on NIH's official test split, as PUBLISHED BY OTHERS (not measured here: no NIH images and no GPU here):
# no published run of exactly this recipe is known to us. Its anchors: Wang et al. 2017 (ChestX-ray8 paper, ImageNet
# ResNet-50): mean AUROC 0.745; whole networks fine-tuned at 100x this rate: 0.81-0.82 (config/nih_full_finetune.py).
# A partially frozen network at 1e-5 is expected between the two. Measure it, and add your figure to the table in
# docs/training.md.
DATA_DIR = "data/nih"
OUT_DIR = "checkpoints/nih_seed"
IMAGE_SIZE = 224
LOAD_SIZE = 256
BATCH_SIZE = 64
EPOCHS = 10
PRETRAINED = "imagenet"
TRAINABLE_LAYERS = "layer4"
LEARNING_RATE = 1e-5
WEIGHT_DECAY = 1e-4
LR_SCHEDULE = "plateau"
LR_PATIENCE = 1
LR_FACTOR = 0.1
EARLY_STOPPING_PATIENCE = 3
POS_WEIGHT = "ratio"
