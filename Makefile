# make demo: set up, then pretrain + evaluate on real Fashion-MNIST on the CPU.  make test: set up, then the tests.
PYTHON ?= python3
DEMO_DIR ?= runs/demo
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test bench bench-gpu

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

bench: setup
	$(PYTHON) bench.py

# the GPU check in one command: bench.py on CUDA, then 300 steps of train.py on 96 px images (synthetic, so that
# it needs no download), whose img/s land in $(GPU_RUN)/metrics.jsonl
GPU_DATA ?= /tmp/simclr-gpu-data
GPU_RUN ?= /tmp/simclr-gpu-run
bench-gpu: setup
	$(PYTHON) bench.py --device cuda --out bench_gpu.json
	$(PYTHON) -c "import os, torch, torchvision; d = '$(GPU_DATA)/train/x'; os.makedirs(d, exist_ok=True); \
	  [torchvision.io.write_png(torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8), f'{d}/{i}.png') for i in range(8192)]"
	$(PYTHON) train.py --dataset folder --data-dir $(GPU_DATA) --image-size 96 --batch-size 512 --max-steps 300 \
	  --log-every 50 --output-dir $(GPU_RUN)
	tail -n 3 $(GPU_RUN)/metrics.jsonl
