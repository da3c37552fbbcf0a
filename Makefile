# make demo: set up, then pretrain + evaluate on real Fashion-MNIST on the CPU.  make test: set up, then the tests.
PYTHON ?= python3
DEMO_DIR ?= runs/demo
FMNIST := /usr/share/datasets/fashion-mnist
# progress lines appear as they happen, also when the output goes to a file
export PYTHONUNBUFFERED := 1

.PHONY: setup data demo test bench bench-gpu

setup:
	$(PYTHON) -m pip install -q --root-user-action=ignore -r requirements.txt

# Debian's package holds the real Fashion-MNIST idx files; elsewhere torchvision downloads them (needs network)
data:
	@test -d $(FMNIST) || apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) \
	  || sudo -n apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	  || echo "note: could not apt-get dataset-fashion-mnist; torchvision will try to download Fashion-MNIST to ./data"

# The CPU demo: ResNet-50 at width 0.25 (512-d features, about the time per image of ResNet-18 at width 0.5) with
# a stride-2 3x3 stem, 3.5 epochs (819 steps) at batch 256, crops of 25-100% of the image, the paper's colour
# strength 1.0, tau 0.2 and a LARS rate of 9.6 (a short run wants a high one): the best of the short runs in
# BENCHMARKS.md; then the linear probes of SimCLR, random init and raw pixels, and the ablation: fine-tuning both
# networks on 10% of the labels. About 8-9 minutes on 2 CPU cores.
DEMO_TRAIN ?= --arch resnet50 --width 0.25 --stem-stride 2 --batch-size 256 --epochs 4 --max-steps 819 \
  --warmup-epochs 0.3 --crop-scale 0.25 1 --temperature 0.2 --lr 9.6 --seed $(SEED)
DEMO_EVAL ?= --random-init --pixels --protocol linear finetune --finetune-label-fraction 0.1 --finetune-epochs 4 \
  --seed $(SEED)
SEED ?= 0
START := $(shell date +%s)
demo: setup data
	$(PYTHON) train.py --dataset fashion-mnist $(DEMO_TRAIN) --output-dir $(DEMO_DIR)
	$(PYTHON) eval_linear.py --ckpt $(DEMO_DIR)/last.pt $(DEMO_EVAL) --wall-start $(START)

test: setup
	$(PYTHON) -m pip install -q --root-user-action=ignore pytest
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
