# Conveniences over the commands in README.md (Windows users: run those directly).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ifeq ($(OS),Windows_NT)
BIN := $(VENV)/Scripts
endif
PY := $(BIN)/python

.PHONY: install demo bench test test-slow lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-extras.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

# three test-split films of the demo data (seed 0): Consolidation|Pneumothorax, Cardiomegaly|Effusion, Mass|Nodule
DEMO_IMAGES := data/demo/images_001/images/00000100_000.png data/demo/images_002/images/00000182_003.png \
	data/demo/images_003/images/00000412_001.png

# The synthetic dataset, its cache, training, the test-split report, predictions with heat maps (2 CPU cores: ~3 min).
demo: install
	$(PY) demo_data.py --out data/demo
	$(PY) cache.py --data_dir data/demo --size 73
	@echo "Deleting checkpoints/demo (the previous demo run, if any): the demo trains afresh."
	$(PY) -c "import shutil; shutil.rmtree('checkpoints/demo', ignore_errors=True)"
	$(PY) train.py config/demo.py
	$(PY) evaluate.py --checkpoint checkpoints/demo/best.pth
	$(PY) predict.py --checkpoint checkpoints/demo/best.pth $(DEMO_IMAGES) --cam --out checkpoints/demo/predictions
	$(PY) compare.py checkpoints/demo/epoch_01.pth checkpoints/demo/best.pth --names epoch_1,best \
		--out checkpoints/demo/compare
	@echo "Look at: checkpoints/demo/training_curves.png (loss, AUROC and learning rate by epoch),"
	@echo "         checkpoints/demo/evaluation/best/ (report.csv, roc_curves.png, reliability.png, subgroups.png,"
	@echo "                                            localisation.png: the test split),"
	@echo "         checkpoints/demo/predictions/ (*_sheet.png: each film beside its heat maps),"
	@echo "         checkpoints/demo/compare/ (compare.png, compare.md: epoch 1 against the best epoch, paired tests)"

bench: install
	$(PY) bench.py --json bench.json

test: install
	$(PY) -m pytest

# The tests that train for minutes or start many processes (localisation, torchrun, other backbones: ~8 min on 2 cores).
test-slow: install
	$(PY) -m pytest -m slow

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) data/demo checkpoints/demo
