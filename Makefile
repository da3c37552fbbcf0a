# make demo: set up, then pretrain + evaluate on real Fashion-MNIST on the CPU.  make test: set up, then the tests.
PYTHON ?= python3
DEMO_DIR ?= runs/demo
FMNIST := /usr/share/datasets/fashion-mnist
# progress lines appear as they happen, also when the output goes to a file
export PYTHONUNBUFFERED := 1
# glibc keeps freed memory for reuse instead of unmapping it and faulting it in again at every step: 4-7x fewer
# page faults, 6-20% more images per second on the CPU, about 300 MB more resident (BENCHMARKS.md, "Memory allocator")
export MALLOC_MMAP_THRESHOLD_ := 1073741824
export MALLOC_TRIM_THRESHOLD_ := 1073741824

.PHONY: setup data demo demo-val length v2 v2-val search recheck multicrop test bench bench-cpu gpu-check gpu-check-cpu

setup:
	$(PYTHON) -m pip install -q --root-user-action=ignore -r requirements.txt

# Debian's package holds the real Fashion-MNIST idx files; elsewhere torchvision downloads them (needs network)
data:
	@test -d $(FMNIST) || apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) \
	  || sudo -n apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	  || echo "note: could not apt-get dataset-fashion-mnist; torchvision will try to download Fashion-MNIST to ./data"

# The CPU demo: ResNet-50 at width 0.25 (512-d features) with a stride-2 3x3 stem, 3.5 epochs (819 steps) at
# batch 256, crops of 25-100% of the image, the paper's colour strength 1.0, tau 0.5 and a LARS rate of 4.8 (a
# short run wants a high one); then the linear probes of SimCLR, the strongest random-init network and raw pixels
# (eval_linear.py, which also draws neighbours_fashion-mnist.png), and the ablation: fine-tuning both networks on
# 10% of the labels, each at its own rate (finetune.py). Its settings, first tuned on the test split, are
# re-checked on validation images (make search, make recheck, make demo-val; BENCHMARKS.md): nothing here is
# chosen on the test split, which eval_linear.py scores once per encoder and finetune.py after each epoch
# (reporting the last). About 9-10 minutes on 2 CPU cores (BENCHMARKS.md).
DEMO_TRAIN ?= --arch resnet50 --width 0.25 --stem-stride 2 --batch-size 256 --epochs 4 --max-steps 819 \
  --warmup-epochs 0.3 --crop-scale 0.25 1 --temperature 0.5 --lr 4.8 --seed $(SEED)
DEMO_EVAL ?= --random-init --pixels --seed $(SEED)
DEMO_FINETUNE ?= --random-init --label-fraction 0.1 --epochs 4 --seed $(SEED)
DEMO_RATES ?= --lr 0.1 --lr-random 0.2
SEED ?= 0
demo: setup data
	$(PYTHON) train.py --dataset fashion-mnist $(DEMO_TRAIN) --output-dir $(DEMO_DIR)
	$(PYTHON) eval_linear.py --ckpt $(DEMO_DIR)/last.pt $(DEMO_EVAL)
	$(PYTHON) finetune.py --ckpt $(DEMO_DIR)/last.pt $(DEMO_FINETUNE) $(DEMO_RATES)

# The same pretraining (reused when DEMO_DIR holds it), evaluated on 10% of the training split held out (the
# test split is not read): the linear probes of SimCLR's h, of the head's first layer and of z, the random
# variants, and the fine-tuning rates of both networks over a grid. How the demo's choices were made.
FT_GRID ?= 0.00625 0.0125 0.025 0.05 0.1 0.2 0.4 0.8
demo-val: setup data
	$(PYTHON) train.py --dataset fashion-mnist $(DEMO_TRAIN) --output-dir $(DEMO_DIR)
	$(PYTHON) eval_linear.py --ckpt $(DEMO_DIR)/last.pt --eval-on val $(DEMO_EVAL) --head-layers 0 1 2
	$(PYTHON) finetune.py --ckpt $(DEMO_DIR)/last.pt --eval-on val $(DEMO_FINETUNE) --lr $(FT_GRID) \
	  --lr-random $(FT_GRID)

# Does longer pretraining help? The demo's recipe for twice and four times its 819 steps (7 and 14 epochs; the
# warmup keeps its share), seed 0, each probed once on the test split; the 3.5-epoch row is make demo SEED=0.
LENGTH_DIR ?= runs/length
length: setup data
	$(PYTHON) train.py --dataset fashion-mnist $(DEMO_TRAIN) --epochs 8 --max-steps 1638 --warmup-epochs 0.6 \
	  --output-dir $(LENGTH_DIR)/7-epochs
	$(PYTHON) eval_linear.py --ckpt $(LENGTH_DIR)/7-epochs/last.pt --seed $(SEED)
	$(PYTHON) train.py --dataset fashion-mnist $(DEMO_TRAIN) --epochs 16 --max-steps 3276 --warmup-epochs 1.2 \
	  --output-dir $(LENGTH_DIR)/14-epochs
	$(PYTHON) eval_linear.py --ckpt $(LENGTH_DIR)/14-epochs/last.pt --seed $(SEED)

# SimCLRv2's semi-supervised recipe at CPU scale (arXiv 2006.10029): the demo's pretraining with v2's 3-layer
# head, then on 1% and 10% of the labels: the linear probe, fine-tuning from the encoder and from the head's first
# layer, the distilled student (every training image, no labels, the head-layer-1 network as teacher) and the
# random-init network fine-tuned. The rates are make v2-val's (BENCHMARKS.md): 0.1 for SimCLR (the best mean
# of its four rows), 0.2 for random init (of its two), both inside the grid. About 18 minutes on a 2-core AMD
# EPYC (make v2-val: 28), BENCHMARKS.md's 3-seed table.
V2_DIR ?= runs/v2-seed$(SEED)
V2_FRACTIONS ?= --random-init --label-fraction 0.01 0.1 --seed $(SEED)
V2_FINETUNE ?= $(V2_FRACTIONS) --epochs 60 8 --head-layers 0 1 --distill --distill-epochs 2
V2_LR ?= --lr 0.1 --lr-random 0.2
V2_GRID ?= --lr 0.025 0.05 0.1 0.2 0.4 --lr-random 0.025 0.05 0.1 0.2 0.4
v2: setup data
	$(PYTHON) train.py --dataset fashion-mnist $(DEMO_TRAIN) --proj-layers 3 --output-dir $(V2_DIR)
	$(PYTHON) eval_linear.py --ckpt $(V2_DIR)/last.pt $(V2_FRACTIONS)
	$(PYTHON) finetune.py --ckpt $(V2_DIR)/last.pt $(V2_FINETUNE) $(V2_LR)
v2-val: setup data
	$(PYTHON) train.py --dataset fashion-mnist $(DEMO_TRAIN) --proj-layers 3 --output-dir $(V2_DIR)
	$(PYTHON) eval_linear.py --ckpt $(V2_DIR)/last.pt --eval-on val $(V2_FRACTIONS)
	$(PYTHON) finetune.py --ckpt $(V2_DIR)/last.pt --eval-on val $(V2_FINETUNE) $(V2_GRID)

# The recipe search on validation (BENCHMARKS.md): the demo's pretraining and one change at a time (ResNet-18
# at width 0.5 for the same time, tau, crop scale, colour strength, LARS rate), each scored by the linear probe on
# images held out of the training split, then the winners combined. Two runs at a time on one thread each;
# rerunning skips the runs already scored. About 2 hours on 2 CPU cores (BENCHMARKS.md's table: 13,000 s of
# pretraining, two runs at a time).
# BENCHMARKS.md's table searched around the recipe before it (tau 0.2): make search SEARCH_BASE="... --temperature 0.2 ..."
SEARCH_DIR ?= runs/search
SEARCH_BASE ?= --dataset fashion-mnist $(DEMO_TRAIN)
search: setup data
	$(PYTHON) search.py --base "$(SEARCH_BASE)" --out $(SEARCH_DIR) --jobs 2

# The demo's settings that were first tuned on the test split, re-checked on validation
# (BENCHMARKS.md): the crop scale's lower bound, the warmup, the LARS rate, the stem's stride and the
# batch (these two at equal pretraining time), each against its neighbours, and the base with a
# second seed, which gives the table its noise. Two runs at a time on one thread each.
RECHECK_DIR ?= runs/recheck
recheck: setup data
	$(PYTHON) search.py --changes recheck --base "$(SEARCH_BASE)" --out $(RECHECK_DIR) --jobs 2

# Multi-crop on validation (BENCHMARKS.md): the demo's recipe with 2, 4 or 6 small crops of 12 px at
# equal pretraining time, two seeds each; it shares the base and its second seed with make recheck
# when both use the same folder.
multicrop: setup data
	$(PYTHON) search.py --changes multicrop --base "$(SEARCH_BASE)" --out $(RECHECK_DIR) --jobs 2

test: setup
	$(PYTHON) -m pip install -q --root-user-action=ignore pytest
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) bench.py

# The CPU tables of BENCHMARKS.md: bench.py at STL-10's recipe (96 px, ResNet-18, batch 64), then at the
# demo's scale with the allocator thresholds above, with glibc's defaults and with --compile, alternated
# twice, then the step per number of small crops; each writes bench-*.json. About 15 minutes on 2 cores.
DEMO_BENCH ?= --arch resnet50 --width 0.25 --stem-stride 2 --image-size 28 --batch-size 256 --steps 10
bench-cpu: setup
	$(PYTHON) bench.py --out bench-stl10.json
	for i in 1 2; do \
	  $(PYTHON) bench.py $(DEMO_BENCH) --out bench-demo-$$i.json && \
	  env -u MALLOC_MMAP_THRESHOLD_ -u MALLOC_TRIM_THRESHOLD_ \
	    $(PYTHON) bench.py $(DEMO_BENCH) --out bench-glibc-$$i.json && \
	  $(PYTHON) bench.py $(DEMO_BENCH) --compile --out bench-compile-$$i.json || exit 1; \
	done
	$(PYTHON) bench.py $(DEMO_BENCH) --steps 3 --reps 3 --crops 0 2 4 6 --small-size 12 \
	  --small-crop-scale 0.05 0.25 --out bench-crops.json

# The GPU check in one command (.ci/gpu_check.py): the CUDA tests, bench.py, 300 steps of train.py on a
# synthetic 96 px folder (batch 512 eager and compiled, batch 1024) and eval_linear.py, each part under its
# own timeout, 455 s in all; OUT gets one small archive, the last lines printed are the table of results.
OUT ?= gpu-check-out
gpu-check:
	$(PYTHON) .ci/gpu_check.py --out $(OUT)
# The same parts at tiny sizes on the CPU (CI runs it), so that only CUDA-specific failures can be left; it
# checks that the archive and the table are there.
gpu-check-cpu:
	$(PYTHON) .ci/gpu_check.py --cpu --out $(OUT) > $(OUT)-printed.txt; status=$$?; \
	  cat $(OUT)-printed.txt; exit $$status
	tail -n 40 $(OUT)-printed.txt | grep -q '^part ' && tail -n 40 $(OUT)-printed.txt | grep -q '^total *pass'
	tar -tzf $(OUT)/gpu-check.tar.gz | grep -q 'gpu-check/summary.json'
	@echo "gpu-check-cpu: the archive and the table are there"
