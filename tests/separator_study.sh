#!/usr/bin/env bash
# Issue 18's separator study, "why do separators do little here?". STAR against concatenation
# (K=4, no separator), each with the encoder's 2D positions on and off (--enc_pos false: then only
# a separator can say where an image starts), for several seeds; STAR and concatenation at K=16
# (1,088 tokens) for seed 0.
#
#   bash tests/separator_study.sh OUT DIR [WORKERS_PER_GPU]   (DIR: CIFAR-10's train_*.npz)
#   python tests/study_table.py OUT                           # the tables, with paired intervals
#
# No test split is given, so train.py holds out 5,000 of the 50,000 training images (a fixed
# permutation, seed 0) and trains on the other 45,000: every number here is on those 5,000, and
# CIFAR-10's test set stays unseen. A job is one row and seed: pretrain; evaluate with the images
# in slots 1, 3, ... replaced by noise, then by shapes (the plain loss by slot comes with them);
# linear probes (one causal direction) reading the tokens in raster and in cluster order;
# finetune. K=16 rows only pretrain and evaluate with noise. Jobs run WORKERS_PER_GPU at a time on
# every GPU (tests/job_queue.sh). Env: SEEDS (default "0 1 2"; the K=16 rows come with seed 0),
# ROWS (default all: star concat star_nopos concat_nopos star16 concat16), PRE, FT and
# PROBE_EPOCHS (default 12, 6 and 5, as tests/evidence.sh), EXTRA (more train.py flags).
set -euo pipefail
OUT=${1:?usage: bash tests/separator_study.sh OUT DIR [WORKERS_PER_GPU]}
DIR=${2:?usage: bash tests/separator_study.sh OUT DIR [WORKERS_PER_GPU]}
WORKERS=${3:-2}
for f in train_0 train_1 train_2 train_3 train_4; do
    [ -f "$DIR/$f.npz" ] || { echo "separator_study.sh: $DIR/$f.npz is missing" >&2; exit 2; }
done
PY=$(command -v python || command -v python3)
COMMON=(--data "npz:$DIR/train_*.npz" --preset cifar --batch_size 512 --lr 5e-4
        --warmup_epochs 2 --pretrain_epochs "${PRE:-12}" --ft_lr 1e-3 --finetune_epochs "${FT:-6}"
        --eval_every 6 --labeled 0 --progress false ${EXTRA:-})
PROBE=(--mode probe --scan_dirs 1 --finetune_epochs "${PROBE_EPOCHS:-5}" --ft_lr 5e-3
       --eval_every "${PROBE_EPOCHS:-5}")
ROWS=" ${ROWS:-star concat star_nopos concat_nopos star16 concat16} "
source "$(dirname "$0")/job_queue.sh"  # add, step, run_jobs

for s in ${SEEDS:-0 1 2}; do
    add star "$s" all --images_per_seq 4 --separator cluster
    add concat "$s" all --images_per_seq 4 --separator none
    add star_nopos "$s" all --images_per_seq 4 --separator cluster --enc_pos false
    add concat_nopos "$s" all --images_per_seq 4 --separator none --enc_pos false
    if [ "$s" = 0 ]; then
        add star16 0 pre --images_per_seq 16 --separator cluster
        add concat16 0 pre --images_per_seq 16 --separator none
    fi
done

job() {  # job NAME SEED STEPS [model flags...]; STEPS: pre, or all
    local name=$1 seed=$2 steps=$3 dir=$OUT/${1}_s$2 kind order
    shift 3
    local run=("$PY" train.py --seed "$seed" "${COMMON[@]}" "$@")
    local init=(--init "$dir/pretrain.pt")
    step "$name: pretrain" "${run[@]}" --mode pretrain --out "$dir" || return 1
    for kind in noise shapes; do
        step "$name: slots, $kind" "${run[@]}" "${init[@]}" --mode eval --distractor "$kind" \
            --out "$dir/$kind" || return 1
        [ "$steps" = all ] || return 0
    done
    for order in raster cluster; do
        step "$name: probe, $order order" "${run[@]}" "${init[@]}" "${PROBE[@]}" \
            --scan_clusters "$([ "$order" = cluster ] && echo true || echo false)" \
            --out "$dir/probe_$order" || return 1
    done
    step "$name: finetune" "${run[@]}" "${init[@]}" --mode finetune --out "$dir" || return 1
}

run_jobs "$WORKERS"
echo "separator_study.sh: all ${#JOBS[@]} jobs ended"
