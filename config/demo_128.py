# The demo at 128 px, for heat maps that point at the lesions: layer4 is 4 x 4 cells here (2 x 2 at config/demo.py's
# 64 px). Use: python train.py config/demo.py config/demo_128.py
OUT_DIR = "checkpoints/demo_128"
IMAGE_SIZE = 112  # 128 x 0.875: the evaluation crop needs no resize
LOAD_SIZE = 128
BATCH_SIZE = 16  # twice the steps of 32 per epoch: from scratch, lesion detectors need steps more than images
EPOCHS = 5
