#!/usr/bin/env bash
# The whole suite on a GPU machine in P pytest processes at once (default 8), so that it fits in one
# device call: the tests dealt out round robin in pytest's order, each process's output in
# OUT/suite_I.log, then every process's summary line.
#   usage: bash tests/gpu_suite.sh OUT [P]
set -uo pipefail
out=${1:?usage: bash tests/gpu_suite.sh OUT [PROCESSES]}
p=${2:-8}
mkdir -p "$out"
parts=$(mktemp -d)
python -c "import star, torch; torch.cuda.is_available() and star._cuda_kernel()"  # build once
python -m pytest -q --collect-only tests | grep "::" > "$parts/tests.txt"
for i in $(seq 0 $((p - 1))); do
    mapfile -t ids < <(awk -v p="$p" -v i="$i" 'NR % p == i' "$parts/tests.txt")
    OMP_NUM_THREADS=2 python -m pytest -q "${ids[@]}" > "$out/suite_$i.log" 2>&1 &
done
wait
tail -n 1 -q "$out"/suite_*.log
