# make demo: set up, then pretrain + evaluate on real Fashion-MNIST on the CPU.  make test: set up, then the tests.
PYTHON ?= python3
DEMO_DIR ?= runs/demo
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test bench

setup:
	$(PYTHON) -m pip install -q -r requirements.txt

# Debian's package holds the real Fashion-MNIST idx files; elsewhere torchvision downloads them (needs network)
data:
	@test -d $(FMNIST) || apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) \
	  || sudo -n apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	  || echo "note: could not apt-get dataset-fashion-mnist; torchvision will try to download Fashion-MNIST to ./data"

demo: setup data
	$(PYTHON) train.py --dataset fashion-mnist --arch resnet18 --width 0.25 --batch-size 256 --max-steps 200 \
	  --warmup-epochs 1 --workers 2 --output-dir $(DEMO_DIR)
	$(PYTHON) eval_linear.py --ckpt $(DEMO_DIR)/last.pt --epochs 30 --workers 2

test: setup
	$(PYTHON) -m pip install -q pytest
	$(PYTHON) -m pytest -q
