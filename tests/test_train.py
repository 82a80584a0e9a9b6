"""train.py end to end on the CPU, at sizes that keep the whole file fast.

Each test runs train.py's own functions (train.main with a small command line) and checks what a
user would see: the report, checkpoints, log lines and sample grids; exact resumption; the data
loaders; the error messages.
"""
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/, for evidence_table
import evidence_table  # noqa: E402
import star  # noqa: E402
import train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--num_train", "96", "--num_test", "32", "--batch_size", "16", "--progress", "false",
         "--log_every", "2", "--finetune_epochs", "1",
         "--compile", "off"]  # on a GPU too: compiling costs each run 15 s or more; tests below
CPU = SimpleNamespace(device=torch.device("cpu"), master=True, ddp=False, rank=0, world=1)


def run(out, *argv):
    return train.main(["--out", str(out), *SMALL, *argv])


def refused(capsys, out, *argv):
    """Run train.py expecting a user error: exit status 2, no traceback; return its one line."""
    with pytest.raises(SystemExit) as stop:
        run(out, *argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("train.py: error: "), err
    return line


def records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default job (pretrain, finetune from it, finetune from scratch) at a reduced size."""
    out = tmp_path_factory.mktemp("default") / "run"
    argv = ["--pretrain_epochs", "2", "--eval_every", "1", "--labeled", "48"]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = run(out, *argv)
    (out.parent / "report.txt").write_text(printed.getvalue())  # what a learner sees, for a test
    (out.parent / "warnings.txt").write_text("\n".join(str(w.message) for w in caught))
    return out, summary


def test_default_run_end_to_end(default_run, capsys):
    out, summary = default_run
    assert summary["ar_loss_after"] < summary["ar_loss_before"]  # pretraining learns something
    assert 0 <= summary["finetune_acc"] <= 1 and 0 <= summary["scratch_acc"] <= 1
    assert summary["labeled"] == 48 and summary["train"] == 96  # finetuning: the labelled part
    for name in ("pretrain.pt", "finetune.pt", "scratch.pt", "samples_pretrain_e000.png",
                 "samples_pretrain_e002.png"):
        assert os.path.isfile(out / name), name
    ft = [r for r in records(out) if r.get("phase") == "finetune" and r["epoch"] == 1][0]
    assert ft["step"] == 48 // 16  # an epoch of finetuning is the labelled images only
    ckpt = torch.load(out / "pretrain.pt", weights_only=False)
    for key in ("model", "optimizer", "config", "epoch", "step", "rng", "aug_rng"):
        assert key in ckpt
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * (96 // 16)
    assert set(ckpt["rng"][0]) == {"torch", "cuda"}  # nothing draws from numpy's or Python's
    # the grid: a label margin, then three rows (input, predicted, completed) of num_samples
    # images, each enlarged 3x (32 px -> 96 px), 2 px padding
    w, h = Image.open(out / "samples_pretrain_e002.png").size
    assert (w, h) == (train.GRID_MARGIN + 8 * 98 + 2, 3 * 98 + 2)
    lines = records(out)
    assert [r["epoch"] for r in lines if r.get("phase") == "pretrain"] == [0, 1, 2]
    assert all("img_per_s" in r for r in lines if r.get("epoch"))
    assert lines[-1]["summary"]["finetune_acc"] == summary["finetune_acc"]


def test_default_report_is_one_screen_of_what_a_learner_needs(default_run):
    out, summary = default_run
    text = (out.parent / "report.txt").read_text()
    report = text[text.index("STAR on synthetic"):].strip().splitlines()
    assert len(report) <= 12
    assert all(len(line.replace(str(out), "runs/default")) <= 100 for line in report)
    assert "96 training and 32 test images" in report[0] and "seed 0" in report[0]
    assert f"{summary['ar_loss_before']:.4f} before, {summary['ar_loss_after']:.4f} after" in text
    assert "finetuning on 48 labelled training images" in text
    assert f"{100 * summary['finetune_acc']:.1f}%  finetuned from the pretraining" in text
    assert f"{100 * summary['scratch_acc']:.1f}%  from scratch" in text
    assert f"pictures: {out / 'samples_pretrain_e002.png'}" in text
    assert "Traceback" not in text and "warn" not in text.lower()
    assert (out.parent / "warnings.txt").read_text() == ""


def test_mode_all_finetunes_from_the_end_of_its_own_pretraining(tmp_path, monkeypatch):
    """Every encoder weight the finetuned classifier starts from is the pretrained encoder's as
    pretraining ended (each scan direction a copy of the causal one); from scratch: none is."""
    start = {}
    end = {}
    phase = train.train_phase

    def spy(name, model, *rest):
        start[name] = {k: v.clone() for k, v in model.state_dict().items()}
        history = phase(name, model, *rest)
        end[name] = {k: v.clone() for k, v in model.state_dict().items()}
        return history
    monkeypatch.setattr(train, "train_phase", spy)
    run(tmp_path / "r", "--preset", "tiny", "--pretrain_epochs", "2")  # tiny: four scans
    pretrained = end["pretrain"]
    encoder = [k for k in start["finetune"] if k.startswith("encoder.")]
    assert encoder and set(encoder) <= set(pretrained)
    for k in encoder:
        assert torch.equal(start["finetune"][k], pretrained[k].expand_as(start["finetune"][k])), k
    assert not any(torch.equal(start["scratch"][k], start["finetune"][k]) for k in encoder
                   if k.endswith("weight") and pretrained[k].dim() > 1)


def test_report_printed(tmp_path, capsys):
    run(tmp_path / "r", "--pretrain_epochs", "1", "--finetune_epochs", "1",
        "--compare_scratch", "false")
    text = capsys.readouterr().out
    assert "AR loss (test)" in text and "test accuracy" in text and "finetuned" in text


def test_completion_keeps_upper_half_and_fills_lower_half():
    cfg = star.make_config("tiny", patch=4)  # 8x8 patches, 4x4 clusters of 2x2
    model = star.StarPretrain(cfg).eval()
    imgs = torch.randn(4, 3, 32, 32)
    done = train.complete_lower_half(model, imgs)
    assert torch.equal(done[..., :16, :], imgs[..., :16, :])
    assert not torch.allclose(done[..., 16:, :], imgs[..., 16:, :])
    # causal: the completion of the lower half does not depend on the (hidden) true lower half
    other = imgs.clone()
    other[..., 16:, :] = torch.randn_like(other[..., 16:, :])
    assert torch.allclose(train.complete_lower_half(model, other), done, atol=1e-5)


@pytest.mark.parametrize("phase, argv", [
    ("pretrain", ["--mode", "pretrain", "--pretrain_epochs", "2", "--drop_path", "0.2"]),  # RNG
    ("finetune", ["--mode", "finetune", "--finetune_epochs", "2", "--ema", "0.9", "--mixup", "0.8",
                  "--cutmix", "1.0"])])  # the averaged weights and the mixing draws resume too
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch, phase, argv):
    run(tmp_path / "a", *argv)
    calls = {"n": 0}
    crops = train.random_crops

    def interrupt_at_step_9(*a, **k):  # 6 steps per epoch: Ctrl-C during epoch 2, batch 3
        calls["n"] += 1
        if calls["n"] == 9:
            signal.raise_signal(signal.SIGINT)
        return crops(*a, **k)

    monkeypatch.setattr(train, "random_crops", interrupt_at_step_9)
    # Ctrl-C's default handler: a shell's background job (cmd &) starts with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit, match="interrupted"):
            run(tmp_path / "b", *argv)
    finally:
        signal.signal(signal.SIGINT, previous)
    # the checkpoint holds the last finished epoch; --resume repeats the interrupted one
    ckpt = torch.load(tmp_path / "b" / f"{phase}.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 6)
    monkeypatch.setattr(train, "random_crops", crops)
    run(tmp_path / "b", *argv, "--resume")

    def strip(rs):
        return [{k: v for k, v in r.items() if k != "img_per_s"} for r in rs if "phase" in r]
    a = torch.load(tmp_path / "a" / f"{phase}.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / f"{phase}.pt", weights_only=False)
    assert (a["ema"] is None) == (phase == "pretrain")
    weights = [(a["model"], b["model"])] + ([(a["ema"], b["ema"])] if a["ema"] else [])
    if not torch.cuda.is_available():  # the CPU: bit-identical losses and weights
        assert strip(records(tmp_path / "a")) == strip(records(tmp_path / "b"))
        for wa, wb in weights:
            assert all(torch.equal(wa[k], wb[k]) for k in wa)
    else:  # a GPU: the CUDA scan's backward and cuBLAS sums are not deterministic; float noise only
        pairs = zip(strip(records(tmp_path / "a")), strip(records(tmp_path / "b")), strict=True)
        for ra, rb in pairs:
            assert rb == pytest.approx(ra, rel=1e-3, abs=1e-5)
        for wa, wb in weights:
            torch.testing.assert_close(wb, wa, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("flags", [{"mixup": 0.8}, {"cutmix": 1.0}, {"mixup": 0.8, "cutmix": 1.0}])
def test_mix_blends_images_and_labels_alike(flags):
    args = SimpleNamespace(seed=0, **({"mixup": 0.0, "cutmix": 0.0} | flags))
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 16, 16)  # image i: every pixel i
    y = torch.arange(8)
    for step in range(20):
        xm, t = train.mix(x, y, 8, args, step)
        assert t.shape == (8, 8) and torch.allclose(t.sum(1), torch.ones(8))
        # the label shares are the pixel shares: the mean pixel of image i is its labels' mean
        torch.testing.assert_close(xm.mean((1, 2, 3)), t @ torch.arange(8.0))
        assert torch.equal(train.mix(x, y, 8, args, step)[0], xm)  # the step decides the draws
    off = SimpleNamespace(seed=0, mixup=0.0, cutmix=0.0)
    assert all(a is b for a, b in zip(train.mix(x, y, 8, off, 0), (x, y)))


def test_eval_of_a_finetuning_checkpoint_uses_its_ema_weights(tmp_path, capsys):
    run(tmp_path / "ft", "--mode", "finetune", "--ema", "0.5", "--eval_every", "1")
    logged = [r for r in records(tmp_path / "ft") if "test_acc" in r][-1]
    ckpt = tmp_path / "ft" / "finetune.pt"
    result = run(tmp_path / "ev", "--mode", "eval", "--init", str(ckpt))
    assert result["test_acc"] == logged["test_acc"]
    assert result["test_loss"] == pytest.approx(logged["test_loss"], rel=1e-6)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["ema"]["n_averaged"] == 6  # one update per step
    head = saved["model"]["head.weight"]
    assert not torch.allclose(saved["ema"]["module.head.weight"], head)  # averaged, not a copy


def write_npz(path, x, y):
    np.savez(path, x=x, y=y)


def pairs(x, y):
    """The (image bytes, label) pairs of a split, sorted: equal for the same pairs in any order."""
    return sorted(zip((bytes(a.flatten().tolist()) for a in x), (int(c) for c in y)))


def test_npz_loader(tmp_path):
    rng = np.random.default_rng(0)
    xs = [rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8) for _ in range(3)]
    ys = [rng.integers(0, 5, 10) for _ in range(3)]
    for i in range(2):
        write_npz(tmp_path / f"train_{i}.npz", xs[i], ys[i])
    write_npz(tmp_path / "test.npz", xs[2], ys[2])
    args = train.parse_args(["--data", f"npz:{tmp_path}/train_*.npz",
                             "--test_data", f"npz:{tmp_path}/test.npz"])
    data = train.load_data(args, CPU)
    x = np.concatenate(xs[:2])
    y = np.concatenate(ys[:2])
    assert pairs(data.x, data.y) == pairs(torch.from_numpy(x).permute(0, 3, 1, 2), y)
    assert data.x_test.shape == (10, 3, 16, 16)
    assert torch.allclose(data.mean.flatten(),
                          torch.tensor(x.reshape(-1, 3).mean(0) / 255, dtype=torch.float32))
    assert torch.allclose(data.std.flatten(),
                          torch.tensor(x.reshape(-1, 3).std(0) / 255, dtype=torch.float32))
    # no test split: 10% held out, the same every time
    args = train.parse_args(["--data", f"npz:{tmp_path}/train_*.npz"])
    one = train.load_data(args, CPU)
    two = train.load_data(args, CPU)
    assert (len(one.x), len(one.x_test)) == (18, 2) and torch.equal(one.x_test, two.x_test)
    with pytest.raises(ValueError, match="matches no files"):
        train.load_data(train.parse_args(["--data", f"npz:{tmp_path}/nothing_*.npz"]), CPU)


def write_folder(root, classes, n, size, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    pixels = {}
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            a = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(a, mode).save(root / c / f"{i}.png")
            pixels[(c, i)] = a
    return pixels


def test_folder_loader(tmp_path):
    px = write_folder(tmp_path / "train", ["cat", "dog"], 3, 16)
    write_folder(tmp_path / "val", ["cat", "dog"], 2, 16, seed=1)
    data = train.load_data(train.parse_args(["--data", f"folder:{tmp_path}"]), CPU)
    assert (data.x.shape == (6, 3, 16, 16) and data.x_test.shape == (4, 3, 16, 16)
            and data.num_classes == 2)
    want = [(torch.from_numpy(a).permute(2, 0, 1), ["cat", "dog"].index(c))
            for (c, _), a in px.items()]
    assert pairs(data.x, data.y) == pairs(*zip(*want))  # each image with its label, in any order
    # one folder, grayscale: split 90/10 deterministically, one channel
    write_folder(tmp_path / "gray", ["a", "b"], 5, 12, mode="L")
    data = train.load_data(train.parse_args(["--data", f"folder:{tmp_path}/gray"]), CPU)
    assert (data.x.shape, data.x_test.shape) == ((9, 1, 12, 12), (1, 1, 12, 12))
    # images of different sizes need --img_size
    write_folder(tmp_path / "mixed", ["a"], 1, 12)
    write_folder(tmp_path / "mixed", ["b"], 1, 20)
    with pytest.raises(ValueError, match="--img_size"):
        train.load_data(train.parse_args(["--data", f"folder:{tmp_path}/mixed", "--test_data",
                                          f"folder:{tmp_path}/mixed"]), CPU)
    data = train.load_data(train.parse_args(["--data", f"folder:{tmp_path}/mixed", "--test_data",
                                             f"folder:{tmp_path}/mixed", "--img_size", "8"]), CPU)
    assert data.x.shape == (2, 3, 8, 8)


def test_first_n_of_sorted_folders_and_npz_files_sample_every_class(tmp_path):
    """--num_train, --num_test and --labeled take the first N images: of a shuffled split, not of
    the class-sorted order an ImageFolder (or an npz file written class by class) comes in."""
    classes = ["a", "b", "c", "d"]
    write_folder(tmp_path / "train", classes, 10, 8)
    write_folder(tmp_path / "val", classes, 5, 8, seed=1)
    args = train.parse_args(["--data", f"folder:{tmp_path}", "--num_train", "8", "--num_test", "4"])
    data = train.load_data(args, CPU)  # all classes among the first 8, or it refuses
    assert len(set(data.y_test.tolist())) > 1
    x = np.zeros((40, 8, 8), np.uint8)
    y = np.repeat(np.arange(4), 10)  # sorted by class
    write_npz(tmp_path / "sorted.npz", x, y)
    data = train.load_data(train.parse_args(["--data", f"npz:{tmp_path}/sorted.npz"]), CPU)
    assert len(set(data.y[:8].tolist())) >= 3  # what --labeled 8 finetunes on
    assert len(set(data.y_test.tolist())) > 1  # the tenth held out


def test_grayscale_24px_trains(tmp_path):
    x, y = train.synthetic_shapes(64, 24, seed=3)
    write_npz(tmp_path / "gray.npz", x.float().mean(1).round().to(torch.uint8).numpy(), y.numpy())
    out = tmp_path / "run"
    summary = train.main(["--out", str(out), "--data", f"npz:{tmp_path}/gray.npz", "--patch", "4",
                          "--batch_size", "16", "--pretrain_epochs", "1", "--finetune_epochs", "1",
                          "--compare_scratch", "false", "--progress", "false", "--compile", "off"])
    assert np.isfinite(summary["ar_loss_after"]) and "finetune_acc" in summary
    cfg = torch.load(out / "finetune.pt", weights_only=False)["config"]
    assert (cfg["in_chans"], cfg["img_size"], cfg["num_classes"]) == (1, 24, 10)
    assert os.path.isfile(out / "samples_pretrain_e001.png")


def test_unknown_dataset_lists_choices(tmp_path, capsys):
    line = refused(capsys, tmp_path / "r", "--data", "imagenet")
    assert "choose one of synthetic, cifar10, cifar100, folder:PATH, npz:GLOB" in line


def test_image_size_not_divisible_by_patch(tmp_path, capsys):
    write_npz(tmp_path / "d.npz", np.zeros((40, 20, 20, 3), np.uint8), np.zeros(40, np.int64))
    line = refused(capsys, tmp_path / "r", "--data", f"npz:{tmp_path}/d.npz")
    assert re.search(r"20x20 px.*--img_size", line)


def test_cifar_offline_says_how_to_use_local_data(tmp_path, monkeypatch, capsys):
    import torchvision

    def offline(*a, **k):
        raise urllib.error.URLError("no internet")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    line = refused(capsys, tmp_path / "r", "--data", "cifar10", "--data_dir", str(tmp_path / "d"))
    assert re.search("npz:.*folder:", line)


def test_mismatched_checkpoint_config(default_run, tmp_path, capsys):
    out, _ = default_run
    ft = ["--mode", "finetune", "--init"]
    line = refused(capsys, tmp_path / "ft", *ft, str(out / "pretrain.pt"), "--width", "32")
    assert "width=64 there, 32 here" in line
    line = refused(capsys, tmp_path / "ft2", *ft, str(out / "finetune.pt"))
    assert "needs a pretrain one" in line
    # resuming with another config names the field
    run(tmp_path / "p", "--mode", "pretrain", "--pretrain_epochs", "1")
    line = refused(capsys, tmp_path / "p", "--mode", "pretrain", "--pretrain_epochs", "2",
                   "--resume", "--images_per_seq", "4")
    assert "images_per_seq=2 there, 4 here" in line


def test_existing_run_is_not_overwritten(default_run, capsys):
    out, _ = default_run
    before = os.path.getmtime(out / "pretrain.pt")
    assert "--resume" in refused(capsys, out)
    assert os.path.getmtime(out / "pretrain.pt") == before


def test_eval_checkpoint_and_data_that_does_not_fit(default_run, tmp_path, capsys):
    out, summary = default_run
    result = run(tmp_path / "e", "--mode", "eval", "--init", str(out / "finetune.pt"),
                 "--scan_dirs", "1")  # model flags the checkpoint was made with are welcome
    assert result["test_acc"] == summary["finetune_acc"]  # same test images, same normalisation
    line = refused(capsys, tmp_path / "e3", "--mode", "eval", "--init", str(out / "pretrain.pt"),
                   "--images_per_seq", "4")  # others would be ignored: refused
    assert "images_per_seq=2 there, 4 here" in line
    write_npz(tmp_path / "g.npz", np.zeros((40, 24, 24), np.uint8), np.zeros(40, np.int64))
    line = refused(capsys, tmp_path / "e2", "--mode", "eval", "--init", str(out / "pretrain.pt"),
                   "--data", f"npz:{tmp_path}/g.npz")
    assert "does not fit" in line
    x = train.synthetic_shapes(44)[0].permute(0, 2, 3, 1).numpy()
    write_npz(tmp_path / "c11.npz", x, np.arange(44) % 11)  # 11 classes; pretraining saw 10
    run(tmp_path / "e4", "--mode", "eval", "--init", str(out / "pretrain.pt"), "--data",
        f"npz:{tmp_path}/c11.npz")  # the AR loss reads no labels


def test_eval_of_a_pretraining_checkpoint_splits_the_loss_by_slot(default_run, tmp_path, capsys):
    out, summary = default_run
    result = run(tmp_path / "e", "--mode", "eval", "--init", str(out / "pretrain.pt"))
    assert result["test_loss"] == summary["ar_loss_after"]
    parts = {k: v for k, v in result.items() if k.startswith("loss_slot")}
    assert sorted(parts) == ["loss_slot1_first", "loss_slot1_rest", "loss_slot2_first",
                             "loss_slot2_rest"]
    # K=2 images of N patches, first clusters of c*c; the parts weighted by their targets
    cfg = torch.load(out / "pretrain.pt", weights_only=False)["config"]
    cc = cfg["cluster"] ** 2
    n = (cfg["img_size"] // cfg["patch"]) ** 2
    firsts = parts["loss_slot1_first"] + parts["loss_slot2_first"]
    rests = parts["loss_slot1_rest"] + parts["loss_slot2_rest"]
    assert abs((cc * firsts + (n - cc) * rests) / (2 * n) / result["test_loss"] - 1) < 1e-5
    assert {k: records(tmp_path / "e")[-1][k] for k in parts} == parts
    assert "AR test loss by image slot" in capsys.readouterr().out


def test_distractors_replace_slots_1_3_and_change_the_loss_of_what_follows(default_run, tmp_path,
                                                                           capsys):
    # its own stream: the global one seeded 0 would draw the noise distractor's first image
    x = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(1))
    for kind in ("noise", "shapes"):
        y = train.with_distractors(x, 4, kind)
        assert (y != x).flatten(1).any(1).tolist() == [True, False, True, False] * 2
    out, _ = default_run
    plain = run(tmp_path / "e", "--mode", "eval", "--init", str(out / "pretrain.pt"))
    hit = run(tmp_path / "d", "--mode", "eval", "--init", str(out / "pretrain.pt"),
              "--distractor", "shapes")
    # the same sequences: the plain metrics come out unchanged, next to slot 2's after a distractor
    assert {k: v for k, v in hit.items() if not k.endswith("_shapes")} == plain
    assert sorted(k for k in hit if k.endswith("_shapes")) == ["loss_slot2_first_shapes",
                                                               "loss_slot2_rest_shapes"]
    assert hit["loss_slot2_first_shapes"] != plain["loss_slot2_first"]
    assert "real predecessor -> distractor" in capsys.readouterr().out
    assert records(tmp_path / "d")[-1] == hit


def test_model_flags_take_true_or_false():
    argv = ["--enc_pos", "false", "--scan_clusters", "true"]
    assert train.parse_args(argv).overrides == {"enc_pos": False, "scan_clusters": True}


def test_pretraining_clips_the_gradient_norm_and_finetuning_does_not(tmp_path, monkeypatch):
    clip = torch.nn.utils.clip_grad_norm_
    calls = []

    def spy(params, max_norm, *a, **k):
        calls.append(max_norm)
        return clip(params, max_norm, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    run(tmp_path / "r", "--pretrain_epochs", "1", "--finetune_epochs", "1",
        "--compare_scratch", "false")
    assert calls == [3.0] * (96 // 16)  # every pretraining step, no finetuning step
    # gradients clipped to almost nothing shrink AdamW's steps (against its eps): the clip acts
    # on the step
    run(tmp_path / "c", "--mode", "pretrain", "--pretrain_epochs", "1", "--clip_grad", "1e-12")

    def moved(name):  # how far one epoch moved the AR test loss
        before, after = [r["test_loss"] for r in records(tmp_path / name)
                         if r.get("phase") == "pretrain"]
        return abs(after - before)
    assert moved("c") < moved("r") / 100, (moved("c"), moved("r"))


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    loss = star.next_cluster_loss
    calls = {"n": 0}

    def nan_from_step_8(*a):
        calls["n"] += 1
        return loss(*a) * (float("nan") if calls["n"] >= 8 else 1.0)
    run(tmp_path / "r", "--mode", "pretrain", "--pretrain_epochs", "1")
    # after the first eval and epoch
    monkeypatch.setattr(star, "next_cluster_loss", nan_from_step_8)
    # resumed at step 6: epoch 2 is steps 7-12 (calls 1-6), then step 14 (call 8) is the
    # first bad one
    with pytest.raises(SystemExit,
                       match=r"loss became nan at step 14 \(epoch 3, batch 2\).*epoch 2"):
        run(tmp_path / "r", "--mode", "pretrain", "--pretrain_epochs", "3", "--resume")
    ckpt = torch.load(tmp_path / "r" / "pretrain.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_two_processes_match_one(tmp_path):
    """DDP (gloo on CPUs): 2 processes at the same global batch give the loss curve of 1, and
    the finetuning phase reads the pretraining checkpoint only once rank 0 has written it."""
    common = [*SMALL, "--pretrain_epochs", "1", "--finetune_epochs", "1",
              "--compare_scratch", "false", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "train.py", "--out", str(tmp_path / "one"), *common], cwd=ROOT,
                   env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2", "train.py", "--out", str(tmp_path / "two"), *common],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    one = records(tmp_path / "one")
    two = records(tmp_path / "two")
    for a, b in zip(one[:2], two[:2]):
        for key in ("loss", "test_loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5 * abs(a[key]), (key, a[key], b[key])
    assert "finetune_acc" in two[-1]["summary"]


def run_script(tmp_path, script, rows=None, seeds="0", images=16):
    """tests/SCRIPT OUT DIR 2 at a tiny size on the CPU (ROWS, default: the script's; SEEDS; 1 epoch
    per phase), over npz files of IMAGES random images each; fails unless every job ended; returns
    OUT."""
    data = tmp_path / "c10"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name in ("train_0", "train_1", "train_2", "train_3", "train_4", "test"):
        write_npz(data / f"{name}.npz", rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8),
                  np.arange(images) % 4)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "SEEDS": seeds,
           "ROWS": rows or "", "PRE": "1", "FT": "1", "PROBE_EPOCHS": "1",
           "EXTRA": "--preset tiny --batch_size 16 --compile off"}
    out = tmp_path / "out"
    done = subprocess.run(["bash", f"tests/{script}", str(out), str(data), "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0 and "failed" not in done.stdout, done.stdout + done.stderr
    return out


def test_evidence_script_runs_every_job_and_tabulates_them(tmp_path):
    """tests/evidence.sh (the README's table, slot losses, K, scan directions) at a tiny size, then
    tests/evidence_table.py over what it wrote."""
    out = run_script(tmp_path, "evidence.sh", seeds="0 1")  # every row
    table = subprocess.run([sys.executable, "tests/evidence_table.py", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    for row in ("| scratch | 2 |", "| ARM (K=1, no separator) | 2 |",
                "| STAR (K=4, separators) | 2 |",
                "| STAR - concatenation |", "| STAR K=8 | 1 |", "| concatenation K=8 | 1 |",
                "| 8 | 544 |", "| 2 | 136 |", "Two minus four directions, paired"):
        assert row in table, table
    # without a separator the first image's first cluster is no target
    assert "1: - /" in table
    phases = {"scratch": ["finetune"], "arm": ["pretrain", "probe", "finetune"],
              "concat": ["pretrain", "probe", "finetune"],
              "star": ["pretrain", "probe", "finetune"]}
    for row, ps in phases.items():
        run_dir = out / f"{row}_s1"
        assert set(os.listdir(run_dir)) >= {f"{p}.pt" for p in ps}
        logged = [r for r in records(run_dir) if "summary" not in r]
        assert {r["phase"] for r in logged} == set(ps)
    configs = [torch.load(out / f"{row}_s1" / "pretrain.pt",
                          weights_only=False)["config"] for row in ("arm", "concat", "star")]
    assert [(c["images_per_seq"], c["separator"]) for c in configs] == [
        (1, "none"), (4, "none"), (4, "cluster")]


def test_evidence_script_runs_only_the_rows_asked_for(tmp_path):
    """ROWS picks evidence.sh's rows; STAR's held-out finetunings come only with "heldout"."""
    out = run_script(tmp_path, "evidence.sh", "star scratch")
    assert sorted(p.name for p in out.glob("*.log")) == ["scratch_s0.log", "star_s0.log"]
    assert (out / "star_s0" / "finetune.pt").exists()
    assert not list((out / "star_s0").glob("heldout*"))


def test_separator_study_runs_every_step_and_tabulates_them(tmp_path):
    """tests/separator_study.sh at a tiny size, two of its rows (every step of a row without
    encoder positions, K=16), then tests/study_table.py over what it wrote."""
    # 200 training images: train.py holds out 20, at least one sequence of K=16
    out = run_script(tmp_path, "separator_study.sh", "star_nopos concat16", images=40)
    assert sorted(p.name for p in out.glob("*.log")) == ["concat16_s0.log", "star_nopos_s0.log"]
    star_dir = out / "star_nopos_s0"
    assert {r["phase"] for r in records(star_dir) if "phase" in r} == {"pretrain", "finetune"}
    for sub, phase in (("noise", "eval"), ("shapes", "eval"), ("probe_raster", "probe"),
                       ("probe_cluster", "probe")):
        assert records(star_dir / sub)[-2 if phase == "probe" else -1].get("phase") == phase
    assert records(out / "concat16_s0" / "noise")[-1]["loss_slot16_rest_noise"] > 0
    assert not (out / "concat16_s0" / "shapes").exists()

    def config(path):
        return torch.load(path, weights_only=False)["config"]
    assert config(star_dir / "pretrain.pt")["enc_pos"] is False
    assert config(star_dir / "probe_cluster" / "probe.pt")["scan_clusters"] is True
    assert config(star_dir / "probe_raster" / "probe.pt")["scan_clusters"] is False
    assert config(out / "concat16_s0" / "pretrain.pt")["images_per_seq"] == 16
    table = subprocess.run([sys.executable, "tests/study_table.py", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120).stdout
    for row in ("| STAR, no positions | 1 | 1: ", "| concatenation K=16 | 1 | 1: - /",
                "| STAR, no positions | shapes | 1 |", "| concatenation K=16 | noise | 1 |",
                "| STAR, no positions | 1 | ", "Finetuned, held-out accuracy"):
        assert row in table, table


def test_tables_count_only_runs_that_ended(tmp_path):
    """A finetuning killed after an evaluation (no summary line) is no result: the tables read the
    last run that ended, or nothing."""
    ended = [{"phase": "finetune", "epoch": 15, "test_acc": 0.86}, {"summary": {}}]
    killed = [{"phase": "finetune", "epoch": 6, "test_acc": 0.80}, {"phase": "finetune"}]
    for name, lines, want in (("ended", ended, 0.86), ("killed", killed, None),
                              ("ended, then killed", ended + killed, 0.86)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
        assert evidence_table.last(str(path), "finetune", "test_acc") == want, name


def test_paired_interval_is_students_t():
    m, half, n = evidence_table.paired({0: 0.80, 1: 0.81, 2: 0.82}, {0: 0.79, 1: 0.80, 2: 0.80})
    assert n == 3 and m == pytest.approx(0.04 / 3)
    assert half == pytest.approx(4.303 * 0.005773503 / 3 ** 0.5, rel=1e-5)  # t(0.975, 2 df)
    assert evidence_table.paired({0: 0.8}, {0: 0.7}) is None  # one seed: no interval


def test_precision_follows_the_card(monkeypatch):
    cpu = torch.device("cpu")
    gpu = torch.device("cuda", 0)
    assert train.autocast_dtype("auto", cpu) == torch.float32
    for capability, dtype in [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                              ((9, 0), torch.bfloat16)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert train.autocast_dtype("auto", gpu) == dtype, capability
    assert train.autocast_dtype("fp16", gpu) == torch.float16
    assert train.autocast_dtype("fp32", gpu) == torch.float32


def test_fp16_trains_with_a_gradient_scaler_that_is_checkpointed(tmp_path):
    summary = run(tmp_path / "r", "--mode", "pretrain", "--pretrain_epochs", "1",
                  "--precision", "fp16")
    assert summary["ar_loss_after"] < summary["ar_loss_before"]
    scaler = torch.load(tmp_path / "r" / "pretrain.pt", weights_only=False)["scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler


def test_compiled_run_saves_plain_weights_and_resume_compiles_again(tmp_path, monkeypatch, caplog):
    """--compile on: the step runs compiled (dynamo traces it; its eager backend, since inductor
    takes minutes on a CPU), trains the model that is saved (the eager run's numbers), under keys
    without _orig_mod. (an eager run resumes them); --resume compiles again and says how long."""
    compiled = []
    real = torch.compile

    def spy(model, **kw):
        compiled.append(model)
        assert kw["mode"] == train.compile_mode(True, SimpleNamespace(device=torch.device(
            "cuda" if torch.cuda.is_available() else "cpu"), ddp=False))
        return real(model, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", spy)
    argv = ["--mode", "pretrain", "--preset", "tiny", "--eval_every", "1"]
    caplog.set_level("INFO", logger="train")
    run(tmp_path / "c", *argv, "--pretrain_epochs", "1", "--compile", "on")
    run(tmp_path / "e", *argv, "--pretrain_epochs", "1")
    def numbers(out):
        return [{k: v for k, v in r.items() if k != "img_per_s"} for r in records(out)
                if "phase" in r]
    # the numbers of the eager run, up to float rounding (star.causal_conv's compiled form)
    assert len(compiled) == 1
    for rc, re_ in zip(numbers(tmp_path / "c"), numbers(tmp_path / "e"), strict=True):
        assert rc == pytest.approx(re_, rel=1e-5)
    for key in ("model", "optimizer"):
        saved = torch.load(tmp_path / "c" / "pretrain.pt", weights_only=False)[key]
        assert "_orig_mod" not in str(list(saved)), key
    run(tmp_path / "c", *argv, "--pretrain_epochs", "2", "--compile", "on", "--resume")
    assert len(compiled) == 2  # the resumed run compiles too
    assert len(re.findall(r"pretrain: first step compiled in \d+ s", caplog.text)) == 2
    run(tmp_path / "c", *argv, "--pretrain_epochs", "3", "--resume")  # eager goes on from it
    assert len(compiled) == 2 and numbers(tmp_path / "c")[-1]["epoch"] == 3


def test_compile_mode_graphs_only_for_pretraining_on_one_gpu():
    def mode(pre, device, ddp):
        return train.compile_mode(pre, SimpleNamespace(device=torch.device(device), ddp=ddp))
    assert mode(True, "cuda", False) == "reduce-overhead"
    assert {mode(False, "cuda", False), mode(True, "cuda", True), mode(True, "cpu", False)} == {
        "default"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("make, preset", [(star.StarPretrain, "cifar"),
                                          (star.StarClassifier, "cifar")])  # 4 scan directions
def test_compiled_step_matches_eager_on_a_gpu(make, preset, monkeypatch):
    """One training step of train.py's torch.compile (inductor, the CUDA scan as opaque custom ops)
    and one eager step from the same weights and batch: the same loss and gradients, in float32
    with TF32 off, where only the order of float sums differs (about 1e-6 relative; we allow
    1e-3 of each gradient's norm, plus 1e-6 of the whole gradient's for those near 0); a wrong op,
    a dropped term or an output 1% off is off by far more."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    eager = make(star.make_config(preset, drop_path=0.0)).cuda()
    compiled = make(star.make_config(preset, drop_path=0.0)).cuda()
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(64, 3, 32, 32, device="cuda")
    y = torch.randint(10, (64,), device="cuda")
    step = torch.compile(compiled, dynamic=False)
    losses = []
    for model, call in ((eager, eager), (compiled, step)):
        out = call(x)
        loss = out if make is star.StarPretrain else torch.nn.functional.cross_entropy(out, y)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    total = torch.stack([p.grad.norm() for p in eager.parameters()]).norm().item()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        err = (q.grad - p.grad).norm().item()  # gradients near 0: noise of the whole gradient's
        assert err <= 1e-3 * p.grad.norm().item() + 1e-6 * total, (name, err, p.grad.norm())
