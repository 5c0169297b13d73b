# A stronger recipe, after the published official-split results: the whole ImageNet ResNet-50 fine-tuned at about
# 100x the seed recipe's rate, linear warmup then cosine decay, 75 epochs at 224 px (Xiao et al., "Delving into
# Masked Autoencoders for Multi-Label Thorax Disease Classification", WACV 2023, and their code,
# github.com/lambert-x/medical_mae FINETUNE.md: AdamW, base rate 2.5e-4 per 256 images of batch, weight decay
# 0.05, 5 warmup epochs, cosine, 75 epochs, 224 px).
# Use: python train.py config/nih_full_finetune.py                 (one GPU)
#      torchrun --nproc_per_node=8 train.py config/nih_full_finetune.py --learning_rate 1e-3   (8 GPUs: 8 x the rate)
#
# Expected on NIH's official test split, as PUBLISHED BY OTHERS (not measured here: no NIH images and no GPU here),
# mean AUROC over the 14 findings: DenseNet-121 with ImageNet weights 0.822; ResNet-50 with self-supervised ImageNet
# weights (MoCo v2, BYOL, SwAV) 0.809-0.815 (Xiao et al. 2023, Table 1). A supervised ImageNet ResNet-50 is
# expected near 0.81. They also used RandAugment, which train.py does not.
DATA_DIR = "data/nih"
OUT_DIR = "checkpoints/nih_full_finetune"
IMAGE_SIZE = 224
LOAD_SIZE = 256
BATCH_SIZE = 128  # per GPU
EPOCHS = 75
PRETRAINED = "imagenet"
TRAINABLE_LAYERS = "all"
LEARNING_RATE = 1.25e-4  # 2.5e-4 x 128 / 256 (linear scaling) on one GPU; times the number of GPUs under torchrun
WEIGHT_DECAY = 0.05
LR_SCHEDULE = "cosine"
WARMUP_EPOCHS = 5.0
EARLY_STOPPING_PATIENCE = 0  # the schedule runs its course; best.pth still keeps the epoch of lowest validation loss
POS_WEIGHT = "ratio"
