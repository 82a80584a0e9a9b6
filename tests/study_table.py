"""The tables of tests/separator_study.sh's runs, in Markdown: the AR loss by image slot, the loss
after a distractor, the linear probes in raster and in cluster order, and held-out accuracy with
paired 95% intervals, STAR minus concatenation with the encoder's positions on and off.

    python tests/study_table.py OUT
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evidence_table import (PAIRED_HEAD, last, mean_sd, paired_row, pct,  # noqa: E402
                            print_tables, records, runs, slot_table)

ROWS = {"star": "STAR, positions", "concat": "concatenation, positions",
        "star_nopos": "STAR, no positions", "concat_nopos": "concatenation, no positions"}
K16 = {"star16": "STAR K=16", "concat16": "concatenation K=16"}


def by_seed(out, name, path, phase, key):
    """{seed: the last value of key logged by phase in path (relative to the run folder)}."""
    found = {s: last(os.path.join(d, path), phase, key) for s, d in runs(out, name).items()}
    return {s: v for s, v in found.items() if v is not None}


def interference_table(out):
    """The loss of the images after a replaced one (slots 2, 4, ...), averaged over those slots and
    the seeds: after their real predecessor, after a distractor, and the change."""
    lines = ["| pretraining | distractor | seeds | first cluster: real / after distractor (change) "
             "| other clusters: real / after distractor (change) |", "|---|---|---|---|---|"]
    for name, label in (ROWS | K16).items():
        for kind in ("noise", "shapes"):
            evals = [records(f"{d}/{kind}/log.jsonl") for d in runs(out, name).values()]
            evals = [e[-1] for e in evals if e]
            pairs = {"first": [], "rest": []}  # (real, after a distractor) of every slot and seed
            for e in evals:
                for key, after in e.items():
                    clean = key.removesuffix(f"_{kind}")  # loss_slot{k}_{part}
                    if clean != key:
                        pairs[clean.rsplit("_", 1)[1]].append((e[clean], after))
            cells = []
            for xs in pairs.values():
                real = mean_sd([r for r, _ in xs])[0] if xs else None
                after = mean_sd([a for _, a in xs])[0] if xs else None
                cells.append("-" if real is None else
                             f"{real:.4f} / {after:.4f} ({after - real:+.4f})")
            if evals:
                lines.append(f"| {label} | {kind} | {len(evals)} | {cells[0]} | {cells[1]} |")
    return lines


def probe_table(out):
    lines = ["| pretraining | seeds | probe, raster order | probe, cluster order |",
             "|---|---|---|---|"]
    probes = {}
    for name, label in ROWS.items():
        probes[name] = [by_seed(out, name, f"probe_{order}/log.jsonl", "probe", "test_acc")
                        for order in ("raster", "cluster")]
        if any(probes[name]):
            means = [pct(mean_sd(list(p.values()))[0]) if p else "-" for p in probes[name]]
            lines.append(f"| {label} | {len(probes[name][0])} | {means[0]} | {means[1]} |")
    lines += PAIRED_HEAD
    for name, label in ROWS.items():
        lines += paired_row(f"{label}: cluster - raster order", *probes[name][::-1])
    return lines


def accuracy_table(out):
    lines = ["| pretraining | seeds | held-out top-1 per seed | mean | sd |",
             "|---|---|---|---|---|"]
    acc = {name: by_seed(out, name, "log.jsonl", "finetune", "test_acc") for name in ROWS}
    for name, label in ROWS.items():
        if acc[name]:
            m, sd = mean_sd(list(acc[name].values()))
            each = " / ".join(pct(a) for a in acc[name].values())
            lines.append(f"| {label} | {len(acc[name])} | {each} | **{pct(m)}** | {100 * sd:.2f} |")
    lines += PAIRED_HEAD
    for a, b, name in (("star", "concat", "STAR - concatenation, positions"),
                       ("star_nopos", "concat_nopos", "STAR - concatenation, no positions"),
                       ("star_nopos", "star", "STAR: no positions - positions"),
                       ("concat_nopos", "concat", "concatenation: no positions - positions")):
        lines += paired_row(name, acc[a], acc[b])
    return lines


def slots_table(out):
    return slot_table(out, (ROWS | K16).items(), "noise")  # the plain loss comes with the noise


def main(out):
    print_tables(out, (("AR loss by image slot (held-out images)", slots_table),
                       ("AR loss after a distractor in slots 1, 3, ...", interference_table),
                       ("Linear probes (one causal direction, held-out images)", probe_table),
                       ("Finetuned, held-out accuracy", accuracy_table)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/separator_study")
