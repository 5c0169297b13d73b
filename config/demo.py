# The synthetic demo dataset (python demo_data.py --out data/demo): a ResNet-50 from random init learns all 14
# findings in about 2 minutes on 2 CPU cores. Use: python train.py config/demo.py [--name value ...]
DATA_DIR = "data/demo"
OUT_DIR = "checkpoints/demo"
IMAGE_SIZE = 64  # the phantoms' findings show at 64 px (layer4 is 2 x 2 cells: heat maps name a quadrant)
LOAD_SIZE = 73  # 64 / 0.875: the evaluation crop is a plain centre crop, no resize
BATCH_SIZE = 32
EPOCHS = 6
PRETRAINED = "none"  # offline and self-contained; ImageNet features add little on phantoms
TRAINABLE_LAYERS = "all"  # random early layers would be useless frozen
LEARNING_RATE = 2e-3  # from scratch, a fine-tuning rate (1e-5) would barely move the weights
LR_SCHEDULE = "cosine"  # a short run: warm up, then decay to 0 by the last epoch
WARMUP_EPOCHS = 0.5
POS_WEIGHT = "ratio"  # negatives / positives (at most 21 here): every finding weighs as much as its absence
EARLY_STOPPING_PATIENCE = 0
NUM_WORKERS = 0  # the cache is held in memory (CACHE_ON_DEVICE): no worker processes to start
