# The synthetic demo dataset (python demo_data.py --out data/demo): trains on a CPU in a few minutes.
# Use: python train.py config/demo.py [--name value ...]
DATA_DIR = "data/demo"
OUT_DIR = "checkpoints/demo"
IMAGE_SIZE = 64  # the phantoms' findings are large; 64 px keeps a CPU epoch around half a minute
LOAD_SIZE = 64
BATCH_SIZE = 32
EPOCHS = 5
PRETRAINED = "none"  # offline and self-contained; ImageNet features add little on phantoms
TRAINABLE_LAYERS = "all"  # random early layers would be useless frozen
LEARNING_RATE = 1e-3  # from scratch, a fine-tuning rate (1e-5) would barely move the weights
POS_WEIGHT = "sqrt"  # label-only findings with 1-2 positives would get weights near 1000 and spike the loss
EARLY_STOPPING_PATIENCE = 0
NUM_WORKERS = 0  # 64-px PNGs decode faster than worker processes start
