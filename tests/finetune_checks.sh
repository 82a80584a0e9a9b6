#!/usr/bin/env bash
# Quick GPU checks of two finetuning choices on CIFAR-10, chosen on held-out training images (never the test
# split): fp16 with a gradient scaler against bf16, and two scan directions against four.
# One pretraining (cifar preset, STAR: K=4, separator cluster), then finetunings that differ in one flag.
#   bash tests/finetune_checks.sh OUT DIR [train.py flags]   (DIR holds CIFAR-10's train_0.npz, train_4.npz)
# Trains on the 10,000 images of train_0 and evaluates on the 10,000 of train_4 (both from the training set).
set -euo pipefail
out=$1
dir=$2
shift 2
extra=("$@")
common=(--data "npz:$dir/train_0.npz" --test_data "npz:$dir/train_4.npz" --preset cifar --batch_size 512
        --lr 5e-4 --ft_lr 1e-3 --warmup_epochs 2 --pretrain_epochs 30 --finetune_epochs 10 --eval_every 10
        --progress false --seed 0 "${extra[@]}")
python train.py --mode pretrain --out "$out/pre" "${common[@]}"
for variant in "bf16 4" "fp16 4" "bf16 2"; do
  set -- $variant
  python train.py --mode finetune --init "$out/pre/pretrain.pt" --out "$out/ft_$1_dirs$2" "${common[@]}" \
      --precision "$1" --scan_dirs "$2"
done
for f in "$out"/ft_*/log.jsonl; do
  echo "$f $(tail -n 1 "$f")"
done
