"""The tables of tests/evidence.sh's runs, in Markdown: accuracy per row with paired 95% confidence
intervals over seeds, the AR test loss by image slot, K, and two scan directions against four.

    python tests/evidence_table.py OUT
"""
import glob
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import star  # noqa: E402  (the repository root, for the sequence lengths)

# two-sided 95% quantiles of Student's t for 1..10 degrees of freedom
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]
ROWS = {"scratch": "scratch", "arm": "ARM (K=1, no separator)",
        "concat": "concatenation (K=4, no separator)", "star": "STAR (K=4, separators)"}


def records(path):
    """The JSON lines of one log.jsonl, or [] where the run did not happen."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def last(path, phase, key):
    """The last value of key logged by phase in path, or None. Only runs that ended count: a value
    counts once a summary line follows it (a run killed or still running has written none)."""
    value = None
    pending = None
    for r in records(path):
        if r.get("phase") == phase and key in r:
            pending = r[key]
        if "summary" in r and pending is not None:
            value = pending
            pending = None
    return value


def runs(out, name):
    """{seed: run folder} of one row."""
    found = {}
    for d in glob.glob(os.path.join(out, f"{name}_s*")):
        if os.path.isdir(d):
            found[int(d.rsplit("_s", 1)[1])] = d
    return dict(sorted(found.items()))


def mean_sd(xs):
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd


def paired(a, b):
    """(mean of a - b, half-width of its 95% t interval, n) over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if len(diffs) < 2:
        return None
    m, sd = mean_sd(diffs)
    return m, T975[len(diffs) - 2] * sd / math.sqrt(len(diffs)), len(diffs)


def pct(x):
    return "-" if x is None else f"{100 * x:.2f}"


def accuracy_table(out):
    acc = {}
    lines = ["| row | seeds | test top-1 per seed | mean | sd | linear probe (mean) | AR loss |",
             "|---|---|---|---|---|---|---|"]
    for name, label in ROWS.items():
        folders = runs(out, name)
        acc[name] = {s: last(f"{d}/log.jsonl", "finetune", "test_acc") for s, d in folders.items()}
        acc[name] = {s: a for s, a in acc[name].items() if a is not None}
        probes = [last(f"{d}/log.jsonl", "probe", "test_acc") for d in folders.values()]
        probes = [p for p in probes if p is not None]
        ar = [last(f"{d}/log.jsonl", "pretrain", "test_loss") for d in folders.values()]
        ar = [x for x in ar if x is not None]
        if not acc[name]:
            continue
        m, sd = mean_sd(list(acc[name].values()))
        each = " / ".join(pct(a) for a in acc[name].values())
        probe = pct(mean_sd(probes)[0]) if probes else "-"
        loss = f"{mean_sd(ar)[0]:.4f}" if ar else "-"
        lines.append(f"| {label} | {len(acc[name])} | {each} | **{pct(m)}** | {100 * sd:.2f} "
                     f"| {probe} | {loss} |")
    lines += PAIRED_HEAD
    for a, b in (("star", "arm"), ("star", "concat"), ("concat", "arm"), ("star", "scratch")):
        name = f"{ROWS[a].split(' (')[0]} - {ROWS[b].split(' (')[0]}"
        lines += paired_row(name, acc.get(a, {}), acc.get(b, {}))
    return lines


PAIRED_HEAD = ["", "| paired by seed | difference (points) | 95% t interval | n | significant? |",
               "|---|---|---|---|---|"]


def paired_row(name, a, b):
    """[the Markdown row of paired(a, b) in points], or [] with fewer than two seeds in common."""
    p = paired(a, b)
    if not p:
        return []
    m, h, n = p
    verdict = "yes" if abs(m) > h else "no: the interval holds 0"
    return [f"| {name} | {100 * m:+.2f} | {100 * (m - h):+.2f} to {100 * (m + h):+.2f} | {n} "
            f"| {verdict} |"]


SLOT_ROWS = (("star", "STAR K=4"), ("concat", "concatenation K=4"), ("star8", "STAR K=8"),
             ("concat8", "concatenation K=8"), ("arm", "ARM K=1"), ("star2", "STAR K=2"))


def slot_table(out, rows=SLOT_ROWS, folder="slots"):
    """The AR loss by slot of each (name, label) in rows, from the eval in each run's folder."""
    lines = ["| pretraining | seeds | slot: first cluster / other clusters (mean over seeds) |",
             "|---|---|---|"]
    for name, label in rows:
        evals = [records(f"{d}/{folder}/log.jsonl") for d in runs(out, name).values()]
        evals = [e[-1] for e in evals if e]
        if not evals:
            continue
        cells = []
        for k in range(1, 17):  # K up to 16
            both = []
            for part in ("first", "rest"):
                xs = [e[f"loss_slot{k}_{part}"] for e in evals if f"loss_slot{k}_{part}" in e]
                both.append(f"{mean_sd(xs)[0]:.4f}" if xs else "-")  # no separator: no first
            if both != ["-", "-"]:
                cells.append(f"{k}: {both[0]} / {both[1]}")
        lines.append(f"| {label} | {len(evals)} | {'; '.join(cells)} |")
    return lines


def k_table(out):
    lines = ["| K | tokens per sequence | test top-1, seed 0 |", "|---|---|---|"]
    for name, k in (("arm", 1), ("star2", 2), ("star", 4), ("star8", 8)):
        d = runs(out, name).get(0)
        if d:
            sep = "none" if name == "arm" else "cluster"
            tokens = star.make_config("cifar", images_per_seq=k, separator=sep).seq_len
            lines.append(f"| {k}{' (ARM, no separator)' if k == 1 else ''} | {tokens} "
                         f"| {pct(last(f'{d}/log.jsonl', 'finetune', 'test_acc'))} |")
    return lines


def dirs_table(out):
    acc = {4: {}, 2: {}}
    for s, d in runs(out, "star").items():
        for dirs in acc:
            a = last(f"{d}/heldout_dirs{dirs}/log.jsonl", "finetune", "test_acc")
            if a is not None:
                acc[dirs][s] = a
    lines = ["| scan directions | held-out top-1 per seed | mean |", "|---|---|---|"]
    for dirs, by_seed in acc.items():
        if by_seed:
            each = " / ".join(pct(a) for a in by_seed.values())
            lines.append(f"| {dirs} | {each} | {pct(mean_sd(list(by_seed.values()))[0])} |")
    p = paired(acc[2], acc[4])
    if p:
        m, h, n = p
        lines.append(f"\nTwo minus four directions, paired: {100 * m:+.2f} points, 95% interval "
                     f"{100 * (m - h):+.2f} to {100 * (m + h):+.2f} (n = {n}).")
    return lines


def print_tables(out, tables):
    """Print every (title, function of OUT giving a table's lines) of tables as a section."""
    for title, table in tables:
        print(f"\n### {title}\n")
        print("\n".join(table(out)))


def main(out):
    print_tables(out, (("Accuracy", accuracy_table), ("AR test loss by image slot", slot_table),
                       ("Images per sequence", k_table),
                       ("Scan directions (held-out)", dirs_table)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/evidence")
