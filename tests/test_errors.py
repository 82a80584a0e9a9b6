"""Bad input to train.py: one line naming the culprit, exit status 2, no traceback, nothing lost.

Each case runs train.main in-process on the CPU with the tiny preset and stops before any training,
except those that need a checkpoint first (one short pretraining, shared): they check that it is
byte-identical afterwards.
"""
import errno
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import star  # noqa: E402
import train  # noqa: E402
from test_train import ROOT, SMALL, refused, run, write_folder, write_npz  # noqa: E402


def nothing_written(out):
    return not os.path.exists(out) or not set(os.listdir(out)) & {"pretrain.pt", "log.jsonl"}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A run folder holding pretrain.pt after one epoch."""
    out = tmp_path_factory.mktemp("pre") / "run"
    run(out, "--mode", "pretrain", "--pretrain_epochs", "1")
    return out


@pytest.fixture
def copy(pretrained, tmp_path):
    """A copy of the pretrained run folder to spoil, and the bytes of its checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(pretrained, out)
    return out, (out / "pretrain.pt").read_bytes()


@pytest.mark.parametrize("argv, culprit", [
    (["--batch_size", "0"], "--batch_size"),
    (["--batch_size", "-4"], "--batch_size"),
    (["--log_every", "0"], "--log_every"),
    (["--eval_every", "0"], "--eval_every"),
    (["--images_per_seq", "0"], "--images_per_seq"),
    (["--lr", "0"], "--lr"),
    (["--pretrain_epochs", "-1"], "--pretrain_epochs"),
    (["--pretrain_epochs", "0"], "--pretrain_epochs"),  # mode all would look for a pretraining
    (["--init", "x.pt"], "--init"),  # mode all pretrains from scratch
    (["--mode", "pretrain", "--init", "x.pt"], "--init"),
    (["--mode", "eval"], "--init"),
    (["--mode", "finetune", "--init", "missing.pt"], "--init missing.pt"),
    (["--mode", "bogus"], "--mode"),
    (["--preset", "huge"], "--preset"),
    (["--separator", "bar"], "separator"),
    (["--mode", "pretrain", "--num_test", "1"], "--num_test"),  # fewer test images than K=2
    (["--labeled", "8"], "--labeled 8"),  # mode all: before the pretraining, not after it
    (["--mode", "eval", "--distractor", "fog"], "--distractor"),
    (["--batch_size", "17"], "--batch_size"),  # not whole sequences of K=2
    (["--batch_size", "128"], "--batch_size 128"),  # more than the 96 training images
])
def test_bad_flags(tmp_path, capsys, argv, culprit):
    assert culprit in refused(capsys, tmp_path / "r", *argv)
    assert nothing_written(tmp_path / "r")


def test_distractors_need_two_images_per_sequence_or_more(tmp_path, capsys):
    run(tmp_path / "arm", "--mode", "pretrain", "--pretrain_epochs", "1", "--preset", "tiny",
        "--images_per_seq", "1", "--separator", "none")
    line = refused(capsys, tmp_path / "e", "--mode", "eval", "--distractor", "noise",
                   "--init", str(tmp_path / "arm" / "pretrain.pt"))
    assert "needs a pretraining checkpoint of K >= 2" in line and "K=1" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu(tmp_path, capsys):
    assert "--device cuda" in refused(capsys, tmp_path / "r", "--device", "cuda")


def npz(x, y):
    return lambda d: write_npz(d / "d.npz", x, y) or (["--data", f"npz:{d}/d.npz"], "d.npz")


def images(n=40, c=3):
    return np.zeros((n, 16, 16, c), np.uint8)


def labels(n=40):
    return np.arange(n) % 10


def text_file(d):
    (d / "d.npz").write_text("x,y\n1,2\n")
    return ["--data", f"npz:{d}/d.npz"], "d.npz"


def empty_file(d):
    (d / "d.npz").write_bytes(b"")
    return ["--data", f"npz:{d}/d.npz"], "d.npz"


def without_prefix(d):
    write_npz(d / "d.npz", images(), labels())
    return ["--data", f"{d}/d.npz"], f"npz:{d}/d.npz"


def labels_out_of_range(d):
    write_npz(d / "train.npz", images(), labels())
    write_npz(d / "test.npz", images(10), labels(10) + 3)  # 3..12: not among 0..9
    return ["--data", f"npz:{d}/train.npz", "--test_data", f"npz:{d}/test.npz"], "test.npz"


def empty_folder(d):
    os.makedirs(d / "empty")
    return ["--data", f"folder:{d}/empty"], "empty"


def mixed_sizes(d):
    write_folder(d / "f", ["a"], 2, 16)
    write_folder(d / "f", ["b"], 2, 24)
    return ["--data", f"folder:{d}/f"], "--img_size"


def corrupt_image(d):
    write_folder(d / "f", ["a", "b"], 3, 16)
    (d / "f" / "b" / "1.png").write_bytes(b"not a png")
    return ["--data", f"folder:{d}/f"], "1.png"


def truncated_image(d):
    write_folder(d / "f", ["a", "b"], 3, 16)
    png = (d / "f" / "a" / "2.png").read_bytes()
    (d / "f" / "a" / "2.png").write_bytes(png[:len(png) // 2])
    return ["--data", f"folder:{d}/f"], "2.png"


@pytest.mark.parametrize("make", [
    npz(np.zeros((40, 3, 16, 16), np.uint8), labels()),  # channels-first
    npz(images(c=5), labels()),  # 5 channels
    npz(images().astype(np.float32), labels()),
    npz(images(), np.where(labels() == 9, 1000, labels())),  # a label of 1000: 1001 classes
    npz(images(), labels() + 1),  # 1-based
    npz(images(), labels().astype(np.float32)),
    npz(images(), labels() - 1),  # a negative label
    npz(images(), labels()[:, None]),  # (N, 1)
    npz(images(), np.eye(10, dtype=np.int64)[labels()]),  # one-hot
    npz(images(), labels()[:30]),  # fewer labels than images
    text_file, empty_file, without_prefix, labels_out_of_range,
    lambda d: (["--data", f"npz:{d}/missing_*.npz"], "missing_"),
    lambda d: (["--data", f"folder:{d}/missing"], "missing"),
    empty_folder, mixed_sizes, corrupt_image, truncated_image,
], ids=["channels_first", "5_channels", "float_x", "label_1000", "one_based", "float_labels",
        "negative_label", "labels_n_by_1", "one_hot", "too_few_labels", "text_npz", "empty_npz",
        "no_prefix", "test_labels", "missing_npz", "missing_folder", "empty_folder", "mixed_sizes",
        "corrupt_image", "truncated_image"])
def test_bad_data_refused_before_training(tmp_path, capsys, make):
    argv, culprit = make(tmp_path)
    assert culprit in refused(capsys, tmp_path / "r", *argv)  # mode all: before pretraining
    assert nothing_written(tmp_path / "r")


def test_bad_data_messages_say_what_to_do(tmp_path, capsys):
    write_npz(tmp_path / "cf.npz", np.zeros((40, 3, 16, 16), np.uint8), labels())
    assert "channels-first" in refused(capsys, tmp_path / "r", "--data", f"npz:{tmp_path}/cf.npz")
    write_npz(tmp_path / "one.npz", images(), labels() + 1)
    assert "[0] absent" in refused(capsys, tmp_path / "r", "--data", f"npz:{tmp_path}/one.npz")


@pytest.mark.parametrize("spoil", ["garbage", "truncated"])
def test_unreadable_checkpoint(copy, tmp_path, capsys, spoil):
    out, good = copy
    path = out / "pretrain.pt"
    path.write_bytes(b"garbage" if spoil == "garbage" else good[:len(good) // 2])
    spoilt = path.read_bytes()
    resume = ["--mode", "pretrain", "--pretrain_epochs", "2", "--resume"]
    assert str(path) in refused(capsys, out, *resume)
    assert str(path) in refused(capsys, tmp_path / "ft", "--mode", "finetune", "--init", str(path))
    assert path.read_bytes() == spoilt


@pytest.mark.parametrize("argv, fields", [
    (["--batch_size", "32"], ["batch_size=16 there, 32 here"]),
    (["--lr", "1e-3"], ["lr=0.01 there, 0.001 here"]),
    (["--batch_size", "32", "--lr", "1e-3", "--seed", "1"],
     ["batch_size=16", "lr=0.01", "seed=0"]),
    (["--num_train", "64"], ["num_train=96 there, 64 here"]),
    (["--data", "npz:{tmp}/other.npz"], ["data='synthetic' there"]),
])
def test_resume_with_other_flags_names_them(copy, tmp_path, capsys, argv, fields):
    out, before = copy
    x, y = train.synthetic_shapes(96, 32, seed=5)
    write_npz(tmp_path / "other.npz", x.permute(0, 2, 3, 1).numpy(), y.numpy())
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    line = refused(capsys, out, "--mode", "pretrain", "--pretrain_epochs", "2", "--resume", *argv)
    assert all(f in line for f in fields), line
    assert (out / "pretrain.pt").read_bytes() == before


def test_out_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert "--out" in refused(capsys, tmp_path / "f")
    assert "--out" in refused(capsys, tmp_path / "f" / "run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_read_only(tmp_path, capsys):
    os.makedirs(tmp_path / "ro")
    os.chmod(tmp_path / "ro", 0o500)
    try:
        assert "--out" in refused(capsys, tmp_path / "ro")
        assert "--out" in refused(capsys, tmp_path / "ro" / "run")
    finally:
        os.chmod(tmp_path / "ro", 0o700)


def test_disk_full_keeps_the_last_checkpoint(copy, capsys, monkeypatch):
    out, before = copy
    save = torch.save

    def full(obj, path):  # the disk fills up halfway through the file
        save(obj, path)
        with open(path, "r+b") as f:
            f.truncate(100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full)
    line = refused(capsys, out, "--mode", "pretrain", "--pretrain_epochs", "2", "--resume")
    assert str(out / "pretrain.pt") in line and "--resume" in line
    assert (out / "pretrain.pt").read_bytes() == before
    assert not os.path.exists(out / "pretrain.pt.tmp")


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("STAR_DEBUG", "1")
    with pytest.raises(train.UserError, match="--batch_size"):
        run(tmp_path / "r", "--batch_size", "0")


def test_command_line_prints_one_line_and_exits_2(tmp_path):
    argv = [sys.executable, "train.py", "--out", str(tmp_path / "r"), "--log_every", "0"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["train.py: error: --log_every must be at least 1, got 0"]


def test_bad_star_scan_stops_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STAR_SCAN", "bogus")
    line = refused(capsys, tmp_path / "r")
    assert line == "train.py: error: STAR_SCAN must be one of auto, cuda, torch, ref; got 'bogus'"
    assert not os.path.exists(tmp_path / "r")  # not even the run folder


def test_flag_choices_are_the_values_star_takes(monkeypatch):
    u = torch.zeros(1, 1, 1)
    for value in train.SCANS:  # star takes each (cuda on CPU inputs: a RuntimeError, not a value)
        monkeypatch.setenv("STAR_SCAN", value)
        try:
            star._scan_backend(u, u, torch.zeros(1, 1), None)
        except RuntimeError:
            assert value == "cuda"
    for name, values in train.MODEL_CHOICES.items():
        for v in values:
            star.make_config("tiny", **{name: v})
        with pytest.raises(ValueError):
            star.make_config("tiny", **{name: 3 if name == "scan_dirs" else "bogus"})
    assert [d for d in range(9) if d in train.MODEL_CHOICES["scan_dirs"]] == [1, 2, 4]


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    line = refused(capsys, tmp_path / "r", "--resume", "--preset", "tiny", "--pretrain_epochs", "1")
    expected = f"--resume: {tmp_path / 'r'} holds no checkpoint, so nothing to resume there"
    assert line == f"train.py: error: {expected}"
    assert nothing_written(tmp_path / "r")


def test_user_error_after_setup_is_stderrs_one_line(tmp_path):
    """An error found once the run has started (here: the data, when it is read) prints one line
    too, in a real process: the progress log goes to stdout."""
    write_npz(tmp_path / "d.npz", np.zeros((40, 3, 16, 16), np.uint8), np.arange(40) % 10)
    argv = [sys.executable, "train.py", "--out", str(tmp_path / "r"), *SMALL,
            "--data", f"npz:{tmp_path}/d.npz"]  # channels first
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = done.stderr
    assert done.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"train.py: error: {tmp_path}/d.npz: x must be uint8"), err
    assert "precision:" in done.stdout  # the set-up ran before the error
    assert nothing_written(tmp_path / "r")


def test_help_describes_every_flag():
    parser = train.make_parser()
    text = parser.format_help()
    flags = [a for a in parser._actions if a.dest != "help"]
    assert len(flags) > 40
    for a in flags:
        assert a.help and a.option_strings[0] in text, a.dest
    formatter = parser._get_formatter()
    for a in flags:
        if not a.dest.startswith("model_"):
            assert f"(default: {a.default})" in formatter._expand_help(a), a.dest
    # model flags default to the preset's: the value, or each preset's where they differ
    assert all("(default: " in a.help for a in flags if a.dest.startswith("model_"))
    words = " ".join(text.split())
    assert "(default: 4)" in words and "(default: tiny/demo/cifar/base 32/64/192/768)" in words
    assert "see star.StarConfig" not in text
    assert "{all,pretrain,finetune,probe,eval}" in text and "{tiny,demo,cifar,base}" in text
    assert "{auto,cpu,cuda}" in text and "{none,token,cluster}" in text and "{1,2,4}" in text
    helps = {a.dest: a.help for a in flags}
    assert all(helps[f].startswith("finetuning:") for f in ("label_smoothing", "mixup", "cutmix",
                                                            "ema", "layer_decay"))
    assert "pretraining" in helps["model_drop_path"] and "--batch_size" in helps["labeled"]
