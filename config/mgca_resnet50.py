# A chest-X-ray-pretrained ResNet-50 from a weights file: MGCA's (Wang et al., "Multi-Granularity Cross-modal
# Alignment for Generalized Medical Visual Representation Learning", NeurIPS 2022: images and reports of MIMIC-CXR,
# no NIH film), fine-tuned whole as EVA-X's authors fine-tuned it for their comparison (hustvl/EVA-X,
# classification/train_files/resnet/cxr14/r50_mgca.sh: 75 epochs, AdamW at a base rate of 2.5e-4 per 256 films,
# weight decay 0.05, 5 warmup epochs, cosine; the medical_mae recipe that config/nih_full_finetune.py follows).
# Weights: MGCA's resnet_50.ckpt, from the Google Drive folder its README links (github.com/HKU-MedAI/MGCA; no license
# is named there: ask its authors before you share it). It is a PyTorch Lightning checkpoint whose Python objects this
# project will not unpickle; save its weights alone once, on a file you trust:
#   python -c "import torch; c = torch.load('resnet_50.ckpt', weights_only=False);
#              torch.save(c['state_dict'], 'mgca_resnet50.pth')"                        (one line)
# train.py then takes the ResNet-50 out of its img_encoder_q.model. prefix and says how many tensors it loaded.
# Use: python train.py config/mgca_resnet50.py --pretrained path/to/mgca_resnet50.pth
#
# Published by EVA-X's authors (not measured here: no NIH images, no weights and no GPU here): mean AUROC 81.3 on NIH's
# official test list (MedKLIP's ResNet-50 81.2). They chose their model on the test list and used RandAugment; ours is
# chosen on validation, with transforms.py's augmentation, so expect a little less.
DATA_DIR = "data/nih"
OUT_DIR = "checkpoints/mgca_resnet50"
BACKBONE = "resnet50"
PRETRAINED = "mgca_resnet50.pth"
IMAGE_SIZE = 224
LOAD_SIZE = 256
BATCH_SIZE = 128  # per GPU
EPOCHS = 75
TRAINABLE_LAYERS = "all"
LEARNING_RATE = 1.25e-4  # 2.5e-4 x 128 / 256 on one GPU; times the number of GPUs under torchrun
WEIGHT_DECAY = 0.05
LR_SCHEDULE = "cosine"
WARMUP_EPOCHS = 5.0
EARLY_STOPPING_PATIENCE = 0
POS_WEIGHT = "ratio"
