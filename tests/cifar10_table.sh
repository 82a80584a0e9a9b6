#!/usr/bin/env bash
# The full-recipe CIFAR-10 table (tests/results/README.md): scratch | ARM (K=1, no separator) |
# concatenation (K=4, no separator) | STAR (K=4, separators), the same `cifar` model and the same
# finetuning recipe for every row, then a linear probe of each pretrained encoder (frozen, its own
# causal scan). One row per GPU, in parallel when there are several.
#
#   bash tests/cifar10_table.sh OUT SEED [train.py flags...]        (run from the repository root)
#   bash tests/cifar10_table.sh runs/c10 0                          # CIFAR-10 through torchvision
#   bash tests/cifar10_table.sh runs/c10 0 --data npz:'DIR/train_*.npz' \
#       --test_data npz:DIR/test.npz                                # offline
#
# Budget (one H100 or H200 per row): 36 pretraining epochs (1.8M images, every pretrained row sees
# the same ones) and 15 finetuning epochs, each phase under 5 minutes. Writes OUT/ROW_sSEED/
# (checkpoints, log.jsonl, samples) and OUT/ROW_sSEED.log, the row's console output with its wall
# times.
set -euo pipefail
OUT=${1:?usage: bash tests/cifar10_table.sh OUT SEED [train.py flags...]}
SEED=${2:?usage: bash tests/cifar10_table.sh OUT SEED [train.py flags...]}
shift 2
COMMON=(--data cifar10 --preset cifar --batch_size 512 --lr 5e-4 --warmup_epochs 2
        --pretrain_epochs 36 --ft_lr 1e-3 --finetune_epochs 15 --eval_every 6 --labeled 0
        --seed "$SEED" --progress false "$@")
PROBE=(--mode probe --scan_dirs 1 --finetune_epochs 8 --ft_lr 5e-3 --eval_every 8)
PY=$(command -v python || command -v python3)
mkdir -p "$OUT"

timed() {  # timed LABEL COMMAND...: run it, then print "LABEL S s" with its wall time
    local label=$1 t0=$SECONDS
    shift
    "$@"
    echo "$label $((SECONDS - t0)) s"
}

row() {  # row NAME [model flags...]: pretrain, probe and finetune (scratch: finetune only)
    local name=$1 dir=$OUT/${1}_s$SEED init=""
    shift
    [ "$name" = scratch ] || init=$dir/pretrain.pt
    {
        if [ "$name" != scratch ]; then
            timed "$name: pretrain" "$PY" train.py --mode pretrain --out "$dir" "${COMMON[@]}" "$@"
            timed "$name: probe" "$PY" train.py --init "$dir/pretrain.pt" --out "$dir" \
                "${COMMON[@]}" "$@" "${PROBE[@]}"
        fi
        timed "$name: finetune" "$PY" train.py --mode finetune ${init:+--init "$init"} \
            --out "$dir" "${COMMON[@]}" "$@"
    } > "$dir.log" 2>&1
}

# build the CUDA scan once
"$PY" -c "import star, torch; torch.cuda.is_available() and star._cuda_kernel()"
GPUS=$("$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))")
ROWS=("scratch" "arm --images_per_seq 1 --separator none"
      "concat --images_per_seq 4 --separator none" "star --images_per_seq 4 --separator cluster")
for g in $(seq 0 $((GPUS - 1))); do  # GPU g takes rows g, g + GPUS, ... one after another
    (for i in $(seq "$g" "$GPUS" $((${#ROWS[@]} - 1))); do
        CUDA_VISIBLE_DEVICES=$g row ${ROWS[$i]} \
            || echo "row ${ROWS[$i]%% *} failed: see $OUT/${ROWS[$i]%% *}_s$SEED.log"
    done) &
done
wait
grep -h -E "^(scratch|arm|concat|star): " "$OUT"/*_s"$SEED".log
