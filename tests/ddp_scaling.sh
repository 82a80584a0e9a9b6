#!/usr/bin/env bash
# Scaling of train.py over the GPUs of one machine, at a fixed batch per GPU (as users run it):
#   bash tests/ddp_scaling.sh OUT PER_GPU NGPUS [train.py flags]
# Runs pretraining then finetuning (cifar preset, generated 32 px data; the speed does not depend on
# the pixels; finetuning on every image, --labeled 0, so that any batch fits) on 1 GPU at
# PER_GPU images a step and on NGPUS GPUs at NGPUS x PER_GPU, and once more on 1 GPU at
# NGPUS x PER_GPU, whose loss curve the NGPUS-GPU run should equal within numerical noise.
set -euo pipefail
out=$1
per=$2
n=$3
shift 3
common=(--data synthetic --num_train 51200 --num_test 2048 --preset cifar --lr 5e-4 --ft_lr 1e-3
        --warmup_epochs 1 --pretrain_epochs 3 --finetune_epochs 3 --eval_every 3 --labeled 0
        --compare_scratch false --progress false --seed 0 "$@")
python train.py --out "$out/gpu1_b$per" --batch_size "$per" "${common[@]}"
torchrun --standalone --nproc_per_node "$n" train.py --out "$out/gpu${n}_b$((n * per))" \
    --batch_size "$((n * per))" "${common[@]}"
python train.py --out "$out/gpu1_b$((n * per))" --batch_size "$((n * per))" "${common[@]}"
python - "$out" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/*/log.jsonl")):
    recs = [json.loads(line) for line in open(path)]
    rates = {r["phase"]: [] for r in recs if "img_per_s" in r}
    for r in recs:
        if "img_per_s" in r:
            rates[r["phase"]].append(r["img_per_s"])
    losses = [round(r["loss"], 6) for r in recs if "loss" in r]
    print(path.split("/")[-2], "images/s per epoch:", rates, "train loss per epoch:", losses)
PY
