#!/usr/bin/env bash
# Quick GPU checks of finetuning choices on CIFAR-10, chosen on held-out training images (never the
# test split). One pretraining (cifar preset, STAR: K=4, separator cluster), then finetunings that
# differ in their flags, all at once on the GPU (each a process of its own).
#   bash tests/finetune_checks.sh OUT DIR [train.py flags]   (DIR holds train_0.npz, train_4.npz)
#   VARIANTS='--ema 0.99|--mixup 0.8 --cutmix 1.0' bash tests/finetune_checks.sh ...
# VARIANTS: the finetunings' extra flags, separated by |; by default fp16 with a gradient scaler
# against bf16, and two scan directions against four. Trains on the 10,000 images of train_0 and
# evaluates on the 10,000 of train_4 (both from the training set).
set -euo pipefail
out=$1
dir=$2
shift 2
extra=("$@")
IFS='|' read -r -a variants <<< "${VARIANTS:---precision bf16|--precision fp16|--scan_dirs 2}"
common=(--data "npz:$dir/train_0.npz" --test_data "npz:$dir/train_4.npz" --preset cifar
        --batch_size 512 --lr 5e-4 --ft_lr 1e-3 --warmup_epochs 2 --pretrain_epochs 30
        --finetune_epochs 10 --eval_every 10 --labeled 0 --progress false --seed 0 "${extra[@]}")
python train.py --mode pretrain --out "$out/pre" "${common[@]}"
for i in "${!variants[@]}"; do
    python train.py --mode finetune --init "$out/pre/pretrain.pt" --out "$out/ft_$i" \
        "${common[@]}" ${variants[$i]} > "$out/ft_$i.log" 2>&1 &
done
wait
for i in "${!variants[@]}"; do
    echo "${variants[$i]:-(no flag)}: $(grep '"test_acc"' "$out/ft_$i/log.jsonl" | tail -n 1)"
done
