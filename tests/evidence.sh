#!/usr/bin/env bash
# Issue 12's runs, "does the separator help?": the CIFAR-10 table's four rows (scratch, ARM K=1,
# concatenation K=4, STAR K=4) for several seeds, the AR test loss by image slot of every
# pretraining, separators at K = 2 and 8, and two scan directions against four (chosen on held-out
# training images).
#
#   bash tests/evidence.sh OUT DIR [WORKERS_PER_GPU]   (DIR: CIFAR-10's train_*.npz, test.npz)
#   bash tests/evidence.sh OUT cifar10                 # CIFAR-10 through torchvision instead
#   python tests/evidence_table.py OUT                 # the tables, with paired intervals
#
# A job is one row and seed: pretrain, the slot table (--mode eval), a linear probe, finetune;
# STAR rows also finetune with two and with four directions on 45,000 training images and test on
# the 5,000 held out (train.py's split when no --test_data is given; npz only). Jobs run
# WORKERS_PER_GPU at a time on every GPU (a pretraining step at batch 512 leaves an H200 idle half
# the time), so the wall times in OUT/*.log are not speeds. Env: SEEDS (default "0 1 2"), PRE, FT
# and PROBE_EPOCHS (default 12, 6 and 5; the README's table: 36, 15 and 8), EXTRA (more train.py
# flags, e.g. for a quick check on a CPU), ROWS (default all: star concat arm scratch heldout star8
# concat8 star2; heldout: the STAR rows' held-out finetunings).
set -euo pipefail
OUT=${1:?usage: bash tests/evidence.sh OUT DIR [WORKERS_PER_GPU]}
DIR=${2:?usage: bash tests/evidence.sh OUT DIR [WORKERS_PER_GPU]}
WORKERS=${3:-2}
TEST=(--data cifar10)
HELD=()
if [ "$DIR" != cifar10 ]; then
    for f in train_0 train_1 train_2 train_3 train_4 test; do
        [ -f "$DIR/$f.npz" ] || { echo "evidence.sh: $DIR/$f.npz is missing" >&2; exit 2; }
    done
    TEST=(--data "npz:$DIR/train_*.npz" --test_data "npz:$DIR/test.npz")
    HELD=(--data "npz:$DIR/train_*.npz")  # no test split: train.py holds out 5,000 training images
fi
PY=$(command -v python || command -v python3)
COMMON=(--preset cifar --batch_size 512 --lr 5e-4 --warmup_epochs 2 --pretrain_epochs "${PRE:-12}"
        --ft_lr 1e-3 --finetune_epochs "${FT:-6}" --eval_every 6 --labeled 0 --progress false
        ${EXTRA:-})
PROBE=(--mode probe --scan_dirs 1 --finetune_epochs "${PROBE_EPOCHS:-5}" --ft_lr 5e-3
       --eval_every "${PROBE_EPOCHS:-5}")
ROWS=" ${ROWS:-star concat arm scratch heldout star8 concat8 star2} "
source "$(dirname "$0")/job_queue.sh"  # add, step, run_jobs

held=$([[ $ROWS == *" heldout "* ]] && echo ",heldout" || true)  # STAR's held-out finetunings
for s in ${SEEDS:-0 1 2}; do
    add star "$s" "pre,probe,ft$held" --images_per_seq 4 --separator cluster
    add concat "$s" pre,probe,ft --images_per_seq 4 --separator none
    add arm "$s" pre,probe,ft --images_per_seq 1 --separator none
    add scratch "$s" ft
done
add star8 0 pre,ft --images_per_seq 8 --separator cluster
add concat8 0 pre --images_per_seq 8 --separator none
add star2 0 pre,ft --images_per_seq 2 --separator cluster

job() {  # job NAME SEED STEPS [model flags...]
    local name=$1 seed=$2 steps=$3 dir=$OUT/${1}_s$2
    shift 3
    local run=("$PY" train.py --seed "$seed" "${COMMON[@]}" "$@")
    local init=()
    if [[ $steps == *pre* ]]; then
        step "$name: pretrain" "${run[@]}" "${TEST[@]}" --mode pretrain --out "$dir" || return 1
        step "$name: slots" "${run[@]}" "${TEST[@]}" --mode eval --init "$dir/pretrain.pt" \
            --out "$dir/slots" || return 1
        init=(--init "$dir/pretrain.pt")
    fi
    if [[ $steps == *probe* ]]; then
        step "$name: probe" "${run[@]}" "${TEST[@]}" "${init[@]}" "${PROBE[@]}" --out "$dir" \
            || return 1
    fi
    if [[ $steps == *ft* ]]; then
        step "$name: finetune" "${run[@]}" "${TEST[@]}" "${init[@]}" --mode finetune --out "$dir" \
            || return 1
    fi
    if [[ $steps == *heldout* && ${#HELD[@]} -gt 0 ]]; then
        for dirs in 4 2; do
            step "$name: held-out dirs $dirs" "${run[@]}" "${HELD[@]}" "${init[@]}" \
                --mode finetune --scan_dirs "$dirs" --out "$dir/heldout_dirs$dirs" || return 1
        done
    fi
}

run_jobs "$WORKERS"
echo "evidence.sh: all ${#JOBS[@]} jobs ended"
