# The job queue of tests/evidence.sh and tests/separator_study.sh, which source it, set ROWS (the
# rows to run, " a b ... "), add their jobs with add NAME SEED ..., set OUT (the output folder),
# PY (python) and a function job NAME SEED ...; run_jobs WORKERS then runs every job, WORKERS at a
# time on every GPU (one "GPU" without any), each job's console output in OUT/NAME_sSEED.log.

JOBS=()  # one "NAME SEED ..." per job

add() {  # add NAME SEED STEPS [model flags]: a job, if ROWS names its row
    if [[ $ROWS == *" $1 "* ]]; then
        JOBS+=("$*")
    fi
}

next_job() {  # the index of the next job nobody has taken
    flock "$OUT/.next" bash -c 'n=$(cat "$1"); echo $((n + 1)) > "$1"; echo "$n"' _ "$OUT/.next"
}

step() {  # step LABEL COMMAND...: run it, then print "LABEL S s" with its wall time
    local label=$1 t0=$SECONDS
    shift
    "$@" || { echo "$label: failed"; return 1; }
    echo "$label $((SECONDS - t0)) s"
}

lane() {  # lane GPU: take jobs until none is left
    local gpu=$1 i
    while i=$(next_job) && [ "$i" -lt ${#JOBS[@]} ]; do
        set -- ${JOBS[$i]}
        CUDA_VISIBLE_DEVICES=$gpu job "$@" > "$OUT/${1}_s$2.log" 2>&1 \
            || echo "job $1 seed $2 failed: see $OUT/${1}_s$2.log"
    done
}

run_jobs() {  # run_jobs WORKERS
    local gpus g w
    mkdir -p "$OUT"
    echo 0 > "$OUT/.next"
    "$PY" -c "import star, torch; torch.cuda.is_available() and star._cuda_kernel()"  # build once
    gpus=$("$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))")
    for g in $(seq 0 $((gpus - 1))); do
        for w in $(seq "$1"); do
            lane "$g" &
        done
    done
    wait
}
