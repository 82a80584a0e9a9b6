"""STAR: pretrain a Vision Mamba on separator-packed image sequences; finetune, probe, evaluate it.

    python train.py                        # offline demo: shapes, 500 of them labelled, CPU minutes
    python train.py --data cifar10 --preset cifar --batch_size 512 --lr 5e-4 --warmup_epochs 2 \
        --ft_lr 1e-3 --labeled 0 --pretrain_epochs 36 --finetune_epochs 15 --eval_every 6 \
        --out runs/c10                     # CIFAR-10 on a GPU: see README's table
    python train.py --images_per_seq 1 --separator none ...  # ARM; K>1 without separator: concat
    python train.py --mode finetune --init runs/c10/pretrain.pt --out runs/ft  # no --init: scratch
    python train.py --mode probe --init runs/c10/pretrain.pt --out runs/probe  # frozen encoder
    python train.py --mode eval --init runs/c10/finetune.pt --data cifar10
    python train.py --out runs/c10 --resume ...  # go on after the last finished epoch
    torchrun --standalone --nproc_per_node 8 train.py ...  # DDP: each GPU takes a share of a batch

Data: synthetic | cifar10 | cifar100 | folder:PATH (ImageFolder layout: PATH/train and PATH/val or
PATH/test, or one folder split 90/10) | npz:GLOB (x uint8 N x H x W [x C], y int; the test split
from --test_data npz:GLOB). The model is built for the data's image size, channels and classes;
--img_size resizes the data. Every knob below is a flag (--name value); so is every field of
star.StarConfig (--width 256 --separator token). Run folder: {pretrain,finetune,scratch,probe}.pt
checkpoints, log.jsonl (one JSON line per epoch), and samples_*.png: test images, the
teacher-forced next-cluster predictions, lower halves completed autoregressively.
"""
import argparse
import collections
import glob
import inspect
import json
import logging
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.utils import make_grid
from tqdm import tqdm

import star

log = logging.getLogger("train")


@dataclass
class Args:
    # what to run, on what
    mode: str = "all"             # all: pretrain, then finetune from it and from scratch, report
    data: str = "synthetic"       # synthetic | cifar10 | cifar100 | folder:PATH | npz:GLOB
    test_data: str = ""           # folder:PATH or npz:GLOB test split (else the data's own); none
                                  # (npz, one folder): N // 10 of the N images held out (min 1)
    data_dir: str = "data"        # where torchvision downloads CIFAR
    img_size: int = 0             # resize the images to this side (0: keep the data's size)
    num_train: int = 0            # use the first N training images (0: all; synthetic: 5000)
    num_test: int = 0             # the same for the test split (synthetic: 1000)
    preset: str = "demo"          # star.py preset: tiny | demo | cifar | base
    init: str = ""                # checkpoint to finetune or probe from, or to evaluate
    out: str = "runs/default"     # run folder
    resume: bool = False          # continue the checkpoints in --out where they stopped
    seed: int = 0                 # model initialisation, data order and augmentation
    # pretraining, ARM's recipe (short runs want a higher lr than ARM's 1.5e-4 over 1600 epochs)
    pretrain_epochs: int = 16     # passes over the training set
    batch_size: int = 64          # global batch of both phases, in images, split over the GPUs
    lr: float = 1e-2              # at batch 256; the lr used is lr * batch_size / 256
    warmup_epochs: float = 1.0    # linear lr warm-up, then cosine decay to 0
    min_scale: float = 0.2        # random-resized-crop area in (min_scale, 1), and horizontal flips
    weight_decay: float = 0.05    # AdamW; none on norms, biases, A_log, D, separator, query
    clip_grad: float = 3.0        # pretraining only: clip the gradient norm (ARM: 3.0); 0 = off
    # finetuning (and probing), single images, the preset's scans (scan_dirs)
    finetune_epochs: int = 60     # of the labelled part: 60 x 500 images by default
    ft_lr: float = 5e-3           # at batch 256
    ft_warmup_epochs: float = 1.0  # the same for finetuning
    ft_min_scale: float = 0.35    # the same for finetuning
    ft_drop_path: float = 0.1     # stochastic depth when finetuning (--drop_path is pretraining's)
    label_smoothing: float = 0.1  # finetuning: label smoothing of the cross-entropy
    mixup: float = 0.0            # finetuning: Beta(a, a) of mixup (ARM: 0.8); 0 = off
    cutmix: float = 0.0           # finetuning: Beta(a, a) of cutmix (ARM: 1.0); 0 = off;
                                  # with mixup: either, at random each step
    ema: float = 0.0              # finetuning: test, save the weights' EMA of this decay; 0 = off
    layer_decay: float = 1.0      # finetuning: layer-wise lr decay (ARM: 0.65); 1 = off
    labeled: int = 500            # finetune, probe on the first N images (0: all); >= --batch_size
    compare_scratch: bool = True  # mode all: also finetune from scratch, for the report
    # logging and system
    eval_every: int = 8           # epochs between test evaluations and sample grids, and the last
    log_every: int = 10           # steps between progress-bar updates (and loss checks)
    num_samples: int = 8          # images in each sample grid
    device: str = "auto"          # auto | cpu | cuda
    precision: str = "auto"       # auto: bf16 on GPUs of sm_80+, fp16 (scaled) below, fp32 on CPU
    compile: str = "auto"         # torch.compile the step; auto: on GPUs, not on CPUs (README)
    progress: bool = True         # tqdm bars
    distractor: str = "none"      # mode eval of a pretraining: also with slots 1, 3, ... replaced
    overrides: dict = field(default_factory=dict)  # StarConfig fields given as flags

# -----------------------------------------------------------------------------
# command line, devices

CHOICES = {"mode": ("all", "pretrain", "finetune", "probe", "eval"), "preset": list(star.PRESETS),
           "device": ("auto", "cpu", "cuda"), "precision": ("auto", "bf16", "fp16", "fp32"),
           "compile": ("auto", "on", "off"), "distractor": ("none", "noise", "shapes")}
DATASETS = "synthetic, cifar10, cifar100, folder:PATH, npz:GLOB"
FROM_DATA = ("img_size", "in_chans", "num_classes")  # model fields the data decides
# the flags a resumed phase must share with the run that wrote its checkpoint (besides the model)
RESUMED = ("data", "test_data", "img_size", "num_train", "num_test", "seed", "batch_size",
           "weight_decay", "precision")
PRETRAIN_FLAGS = ("lr", "warmup_epochs", "min_scale", "clip_grad")
FINETUNE_FLAGS = ("ft_lr", "ft_warmup_epochs", "ft_min_scale", "ft_drop_path", "label_smoothing",
                  "layer_decay", "labeled", "mixup", "cutmix", "ema")
# the model fields that fix the weights' shapes
SHAPE_FIELDS = ("in_chans", "patch", "width", "depth", "d_state", "d_conv", "expand", "mlp_ratio")
# number flags must be at least 0 (but --seed), model sizes at least 1; these have other limits
AT_LEAST_1 = ("batch_size", "log_every", "eval_every")
AT_MOST_1 = ("min_scale", "ft_min_scale", "layer_decay", "ft_drop_path", "label_smoothing",
             "drop_path", "ema")
ABOVE_0 = ("lr", "ft_lr", "min_scale", "ft_min_scale", "layer_decay", "mlp_ratio")
SCANS = ("auto", "cuda", "torch", "ref")  # the values of STAR_SCAN that star._scan_backend takes
# the values star.StarConfig takes, and --help texts that say what train.py does with a field
MODEL_CHOICES = {"separator": ("none", "token", "cluster"), "scan_dirs": (1, 2, 4)}
MODEL_HELP = {"dec_depth": "decoder layers, cross-attention only (ARM: 4)",
              "dec_heads": "heads of each decoder layer, a divisor of dec_width (ARM's: 64 wide)",
              "drop_path": "stochastic depth when pretraining (finetuning: --ft_drop_path)"}


def _bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def field_help(cls):
    """{name: the comment beside the field and those indented under it} of a dataclass: --help."""
    src = inspect.getsource(cls)
    found = re.findall(r"^\s+(\w+): \w+ = .*?  # (.*(?:\n {8,}# .*)*)", src, re.M)
    return {name: re.sub(r"\n +# ", " ", text).replace("%", "%%") for name, text in found}


def make_parser():
    p = argparse.ArgumentParser("train.py", description="STAR pretraining and finetuning",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = field_help(Args)
    for f in fields(Args):
        if f.type is bool:  # --flag alone means true
            p.add_argument(f"--{f.name}", default=f.default, type=_bool, help=helps.get(f.name),
                           metavar="true|false", nargs="?", const=True)
        elif f.name != "overrides":  # overrides: the model flags below
            p.add_argument(f"--{f.name}", default=f.default, type=f.type, help=helps.get(f.name),
                           choices=CHOICES.get(f.name))
    helps = field_help(star.StarConfig) | MODEL_HELP
    g = p.add_argument_group("model: fields of star.StarConfig (default: the preset's)")
    for f in fields(star.StarConfig):
        v = [format(getattr(c, f.name), ".4g" * (f.type is float)) for c in star.PRESETS.values()]
        default = v[0] if len(set(v)) == 1 else f"{'/'.join(star.PRESETS)} {'/'.join(v)}"
        if f.name not in FROM_DATA:  # SUPPRESS: only the flags given become overrides
            kind = _bool if f.type is bool else f.type
            g.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS,
                           dest=f"model_{f.name}", choices=MODEL_CHOICES.get(f.name),
                           metavar=None if f.name in MODEL_CHOICES else f.name.upper(),
                           help=f"{helps[f.name]} (default: {default})")
    return p


def parse_args(argv=None):
    ns = vars(make_parser().parse_args(argv))
    overrides = {k.removeprefix("model_"): ns.pop(k) for k in list(ns) if k.startswith("model_")}
    return Args(**ns, overrides=overrides)


class UserError(ValueError):
    """A bad flag, file or checkpoint: main prints it in one line and exits with status 2."""


def check_args(args):
    """Refuse flags out of range or that do not go together, before any work."""
    for name, v in (asdict(args) | args.overrides).items():
        if type(v) not in (int, float) or name == "seed":
            continue
        low = 1 if name in AT_LEAST_1 or (name in args.overrides and type(v) is int) else 0
        high = 1 if name in AT_MOST_1 else math.inf
        if not low <= v <= high or (name in ABOVE_0 and v <= 0):
            least = "above 0" if name in ABOVE_0 else f"at least {low}"
            most = " and at most 1" if high == 1 else ""
            raise UserError(f"--{name} must be {least}{most}, got {v}")
    for flag, named in (("data", ("synthetic", "cifar10", "cifar100")), ("test_data", ())):
        spec = getattr(args, flag)
        if spec and spec not in named and not spec.startswith(("npz:", "folder:")):
            kind = "folder" if os.path.isdir(spec) else "npz"
            hint = f"; for this path write {kind}:{spec}" if os.path.exists(spec) else ""
            choose = DATASETS if named else "npz:GLOB, folder:PATH"
            raise UserError(f"unknown --{flag} {spec!r}; choose one of {choose}{hint}")
    if args.init and args.mode in ("all", "pretrain"):
        raise UserError(f"--init is for --mode finetune, probe or eval; --mode {args.mode} "
                        f"pretrains from scratch (to finetune it: --mode finetune --init ...)")
    if args.mode == "eval" and not args.init:
        raise UserError("--mode eval needs --init CHECKPOINT")
    if args.init and not os.path.isfile(args.init):
        raise UserError(f"--init {args.init}: no such file")
    if args.mode == "all" and args.pretrain_epochs == 0:
        raise UserError("--mode all needs --pretrain_epochs 1 or more "
                        "(to finetune from scratch only: --mode finetune)")
    if os.environ.get("STAR_SCAN", "auto") not in SCANS:
        raise UserError(f"STAR_SCAN must be one of {', '.join(SCANS)}; got "
                        f"{os.environ['STAR_SCAN']!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA GPU: use --device cpu (or auto)")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:  # a file there (or above it), no permission
        raise UserError(f"cannot make the run folder --out {args.out} ({e.strerror}): "
                        f"choose another --out") from None
    if not os.access(args.out, os.W_OK):
        raise UserError(f"cannot write into the run folder --out {args.out}: choose another --out")


def setup(args):
    """One process per GPU under torchrun (RANK set), else one process on args.device."""
    ddp = "RANK" in os.environ
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")  # gloo: DDP on CPUs, for tests
    rank = dist.get_rank() if ddp else 0
    world = dist.get_world_size() if ddp else 1
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    logging.basicConfig(format="%(message)s", stream=sys.stdout)  # stderr: errors, tqdm bars
    for name in ("train", "star"):
        logging.getLogger(name).setLevel(logging.INFO if rank == 0 else logging.WARNING)
    dtype = autocast_dtype(args.precision, device)
    log.info(f"precision: {str(dtype).removeprefix('torch.')} on {device}")
    return SimpleNamespace(ddp=ddp, rank=rank, world=world, master=rank == 0, device=device,
                           phase=None, dtype=dtype)


def autocast_dtype(precision, device):
    """bf16 on GPUs that compute in it natively (Ampere on), fp16 on older ones, fp32 on CPUs."""
    if precision == "auto" and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if precision == "auto":
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def autocast(env):
    return torch.autocast(env.device.type, dtype=env.dtype, enabled=env.dtype != torch.float32)

# -----------------------------------------------------------------------------
# data: every image set ends up as uint8 (n, C, H, W) and int64 labels, on the device


def _sdf_plus(u, v):
    horizontal = torch.minimum(0.3 - v.abs(), 1 - u.abs())
    vertical = torch.minimum(0.3 - u.abs(), 1 - v.abs())
    return torch.maximum(vertical, horizontal)


def _box(u, v):
    return torch.maximum(u.abs(), v.abs())


# signed distance of each shape in its own unit coordinates (u, v), positive inside
SHAPES = {
    "disk": lambda u, v: 1 - torch.hypot(u, v),
    "ring": lambda u, v: 0.28 - (torch.hypot(u, v) - 0.72).abs(),
    "square": lambda u, v: 0.85 - _box(u, v),
    "frame": lambda u, v: 0.2 - (_box(u, v) - 0.7).abs(),
    "triangle": lambda u, v: 0.5 - torch.maximum(v, (0.866 * u.abs() - 0.5 * v)),
    "plus": _sdf_plus,
    "cross": lambda u, v: _sdf_plus((u + v) / 2 ** 0.5, (u - v) / 2 ** 0.5),
    "stripes": lambda u, v: torch.minimum(0.85 - _box(u, v), 0.25 * torch.sin(u * 2.5 * math.pi)),
    "checker": lambda u, v: torch.minimum(
        0.85 - _box(u, v), 0.5 * torch.sin(u * 2 * math.pi) * torch.sin(v * 2 * math.pi)),
    "dots": lambda u, v: 0.32 - torch.stack([torch.hypot(u - a, v - b) for a, b in
                                             ((0, -0.6), (-0.55, 0.45), (0.55, 0.45))]).amin(0),
}


def synthetic_shapes(n, size=32, seed=0):
    """The built-in offline data set: n RGB images (n, 3, size, size) uint8 of 10 shapes, labels.
    One shape per image, of random position, radius, rotation and colour, on a background of another
    colour with a random gradient, plus pixel noise. Deterministic from seed; balanced classes."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    y = (torch.arange(n) % len(SHAPES))[torch.randperm(n, generator=g)]
    r = size * (0.18 + 0.17 * rand(n, 1, 1))  # (n, 1, 1) shape radius in pixels
    cx = size / 2 + (size / 2 - r) * (2 * rand(n, 1, 1) - 1)  # (n, 1, 1) centre
    cy = size / 2 + (size / 2 - r) * (2 * rand(n, 1, 1) - 1)
    angle = (rand(n, 1, 1) - 0.5) * math.pi * 2 / 9  # +-20 degrees: plus and cross stay apart
    px = torch.arange(size) + 0.5
    dx = px[None, None, :] - cx  # (n, size, size)
    dy = px[None, :, None] - cy  # (n, size, size)
    u = (dx * angle.cos() + dy * angle.sin()) / r  # the shape's own coordinates
    v = (dy * angle.cos() - dx * angle.sin()) / r
    sdf = torch.empty(n, size, size)
    for c, shape in enumerate(SHAPES.values()):
        sdf[y == c] = shape(u[y == c], v[y == c])
    alpha = torch.sigmoid(2 * sdf * r)[:, None]  # (n, 1, size, size): edges about a pixel wide
    bg = 0.5 * rand(n, 3, 1, 1)  # dark backgrounds, light shapes, hues at random
    fg = bg + 0.3 + 0.2 * rand(n, 3, 1, 1)
    phi = 2 * math.pi * rand(n, 1, 1, 1)
    ramp = (dx[:, None] * phi.cos() + dy[:, None] * phi.sin()) / size  # (n, 1, size, size)
    img = bg * (1 - alpha) + fg * alpha + 0.3 * (rand(n, 3, 1, 1) - 0.5) * ramp
    img = img + 0.06 * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), y


def resize(x, size):
    """uint8 (n, C, H, W) -> (n, C, size, size): a centre square, resized with antialiasing."""
    from torchvision.transforms.v2 import functional as TF
    return TF.resize(TF.center_crop(x, [min(x.shape[-2:])] * 2), [size, size], antialias=True)


def shuffled(x, y):
    """x and y in a random order, the same every run. Folders list their images class by class, npz
    files may too: shuffled, the first --num_train, --num_test or --labeled sample every class."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


def read_npz(pattern):
    """x (n, C, H, W) uint8 and y (n,) int64 from every .npz file that pattern matches, shuffled."""
    files = sorted(glob.glob(os.path.expanduser(pattern)))
    if not files:
        raise UserError(f"npz:{pattern} matches no files")
    xs = []
    ys = []
    for path in files:
        try:
            with np.load(path) as f:
                keys = list(f.keys())
                arrays = [f[k] for k in ("x", "y") if k in f]
        except Exception as e:  # a text, empty or truncated file: numpy's errors vary
            raise UserError(f"cannot read {path} as .npz ({type(e).__name__}: {e})") from None
        if len(arrays) < 2:
            raise UserError(f"{path} holds {keys}; expected arrays x (uint8 N x H x W x C) and y")
        x, y = arrays
        layout = x.ndim == 3 or x.ndim == 4 and x.shape[3] in (1, 3)  # gray or RGB, channels last
        labels = y.ndim == 1 and len(y) == len(x) and np.issubdtype(y.dtype, np.integer)
        if x.dtype != np.uint8 or not layout or not labels:
            first = x.ndim == 4 and x.shape[1] in (1, 3)
            hint = "; x looks channels-first: store x.transpose(0, 2, 3, 1)" if first else ""
            raise UserError(f"{path}: x must be uint8 N x H x W or N x H x W x C with C = 1 or 3, "
                            f"y one integer class per image, shape (N,); got x {x.dtype} "
                            f"{x.shape}, y {y.dtype} {y.shape}{hint}")
        x = torch.from_numpy(x)
        xs.append(x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2))  # gray: one channel
        ys.append(torch.from_numpy(y.astype(np.int64)))
    if len({t.shape[1:] for t in xs}) > 1:
        raise UserError(f"the files of npz:{pattern} hold images of different shapes: "
                        f"{sorted({tuple(t.shape[1:]) for t in xs})}")
    return shuffled(torch.cat(xs), torch.cat(ys))


def read_folder(root, size=0, classes=None):
    """ImageFolder layout (root/CLASS/IMAGE): x (n, C, H, W) uint8, labels, classes; shuffled. One
    channel if all images are grayscale; each cut to a centre square, resized if size is given."""
    from PIL import Image, ImageOps
    from torchvision.datasets import ImageFolder
    if not os.path.isdir(root):
        raise UserError(f"folder:{root}: no such folder")
    try:
        folder = ImageFolder(root)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"folder:{root} is not in ImageFolder layout (one subfolder per class): "
                        f"{e}") from None
    if classes is not None and folder.classes != classes:
        raise UserError(f"{root} has classes {folder.classes}, the training data {classes}")
    images = []
    gray = True  # every image so far in a grayscale mode
    for path, _ in folder.samples:
        try:
            with Image.open(path) as im:
                gray = gray and im.mode in ("1", "L", "I;16", "I")
                im = im.convert("RGB")
                images.append(np.asarray(ImageOps.fit(im, (size, size)) if size else im))
        except (OSError, ValueError) as e:  # not an image, or a truncated one
            raise UserError(f"cannot read {path} as an image ({e}): repair or remove it") from None
    sizes = {a.shape[:2] for a in images}
    if len(sizes) > 1 or any(h != w for h, w in sizes):
        raise UserError(f"the images in {root} are not all square and of one size "
                        f"({sorted(sizes)[:4]}...); pass --img_size N to resize them")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (n, 3, H, W)
    if gray:
        x = x[:, :1].clone()  # (n, 1, H, W)
    return *shuffled(x, torch.tensor(folder.targets)), folder.classes


def load_cifar(name, root, env):
    import torchvision
    make = getattr(torchvision.datasets, name.upper())  # CIFAR10 or CIFAR100
    try:
        if env.master:  # one download, before the other ranks read the files
            make(root, train=True, download=True)
            make(root, train=False, download=True)
        if env.ddp:
            dist.barrier()
        sets = [make(root, train=train) for train in (True, False)]
    except (OSError, RuntimeError) as e:  # no internet: URLError is an OSError
        raise UserError(f"could not get {name} into {root}/ ({e}). Without internet, point at a "
                        f"local copy: --data npz:'DIR/train_*.npz' --test_data npz:DIR/test.npz "
                        f"(x uint8 N x H x W x C, y int), or --data folder:DIR (ImageFolder "
                        f"layout), or --data_dir where torchvision's files are") from None
    splits = [(torch.from_numpy(s.data).permute(0, 3, 1, 2), torch.tensor(s.targets)) for s in sets]
    return *splits, sets[0].classes


def read_splits(args, env):
    """The train and test split of --data (or --test_data), each (x uint8, y), and the classes."""
    classes = None
    test = None
    if args.data == "synthetic":
        train = synthetic_shapes(args.num_train or 5000, args.img_size or 32, seed=0)
        test = synthetic_shapes(args.num_test or 1000, args.img_size or 32, seed=1)
        classes = list(SHAPES)
    elif args.data in ("cifar10", "cifar100"):
        train, test, classes = load_cifar(args.data, args.data_dir, env)
    elif args.data.startswith("folder:"):  # root/train with root/val or root/test, or one folder
        root = args.data[7:]
        sub = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(root, s))]
        train_root = os.path.join(root, "train") if "train" in sub else root
        *train, classes = read_folder(train_root, args.img_size)
        if "train" in sub and len(sub) > 1 and not args.test_data:
            test = read_folder(os.path.join(root, sub[1]), args.img_size, classes)[:2]
    else:  # npz:GLOB (check_args refused the rest)
        train = read_npz(args.data[4:])
    if args.test_data.startswith("npz:"):
        test = read_npz(args.test_data[4:])
    elif args.test_data:
        test = read_folder(args.test_data[7:], args.img_size, classes)[:2]
    elif test is None:  # hold out a tenth of the (shuffled) images for testing, the same each time
        n = max(1, len(train[0]) // 10)
        log.info(f"no test split given: holding out {n} of {len(train[0])} images for testing")
        test = [t[:n] for t in train]
        train = [t[n:] for t in train]
    return train, test, classes


def load_data(args, env):
    """Train and test images (uint8, on the device), labels, classes, per-channel mean and std."""
    train, test, classes = read_splits(args, env)
    x, y = (t[:args.num_train or None] for t in train)
    xt, yt = (t[:args.num_test or None] for t in test)
    num_classes = check_labels(y, yt, len(classes or ()), args)
    if args.img_size:
        x, xt = (resize(t, args.img_size) for t in (x, xt))
    if x.shape[1:] != xt.shape[1:] or x.shape[2] != x.shape[3]:
        raise UserError(f"train images are {tuple(x.shape[1:])} and test images "
                        f"{tuple(xt.shape[1:])} (C, H, W); the model takes square images of one "
                        f"size: pass --img_size N to resize them")
    x, y, xt, yt = (t.to(env.device) for t in (x, y, xt, yt))
    count = x.numel() / x.shape[1] * 255  # pixels per channel, times the largest value
    total = sum(c.double().sum((0, 2, 3)) for c in x.split(4096))  # (C,), in chunks: x may be large
    total_sq = sum((c.double() ** 2).sum((0, 2, 3)) for c in x.split(4096))  # (C,)
    mean = total / count
    std = (total_sq / count / 255 - mean ** 2).clamp(min=1e-6).sqrt()
    log.info(f"data {args.data}: {len(x)} train, {len(xt)} test images of {tuple(x.shape[1:])}, "
             f"{num_classes} classes")
    return SimpleNamespace(x=x, y=y, x_test=xt, y_test=yt, num_classes=num_classes, name=args.data,
                           mean=mean.float().view(1, -1, 1, 1), std=std.float().view(1, -1, 1, 1))


def check_labels(y, y_test, num_classes, args):
    """The number of classes C (given, or the largest label + 1); each must be in training."""
    if not len(y) or not len(y_test):
        raise UserError(f"{args.data}: {len(y)} training and {len(y_test)} test images; "
                        f"both splits need some")
    num_classes = num_classes or int(y.max()) + 1
    missing = sorted(set(range(num_classes)) - set(y.unique().tolist()))
    if y.min() < 0 or missing:
        subset = f" in the first --num_train {args.num_train}" if args.num_train else ""
        raise UserError(f"{args.data}: the training labels must be 0..C-1 with every class "
                        f"present; got labels {int(y.min())}..{int(y.max())}, "
                        f"class(es) {missing[:5]} absent{subset}")
    if y_test.min() < 0 or y_test.max() >= num_classes:
        raise UserError(f"{args.test_data or args.data}: test labels {int(y_test.min())}.."
                        f"{int(y_test.max())} are not among the training classes "
                        f"0..{num_classes - 1}")
    return num_classes


def normalize(x, data):
    return (x.float() / 255 - data.mean) / data.std


def random_crops(n, gen, min_scale):
    """Affine maps (n, 2, 3) for random resized crops (area min_scale..1, aspect 3/4..4/3), flips.
    Like torchvision's RandomResizedCrop, but a crop that would leave the image is clamped, not
    redrawn; drawn for a whole batch on the device, one per image (v2 draws one per batch)."""
    r = torch.rand(n, 5, generator=gen, device=gen.device)
    area = min_scale + (1 - min_scale) * r[:, 0]
    aspect = torch.exp(math.log(3 / 4) + math.log(16 / 9) * r[:, 1])
    w = (area * aspect).sqrt().clamp(max=1)  # (n,) fractions of the image
    h = (area / aspect).sqrt().clamp(max=1)
    theta = torch.zeros(n, 2, 3, device=gen.device)
    theta[:, 0, 0] = w * torch.where(r[:, 4] < 0.5, -1.0, 1.0)  # a flip half of the time
    theta[:, 1, 1] = h
    theta[:, 0, 2] = (1 - w) * (2 * r[:, 2] - 1)  # the crop's centre
    theta[:, 1, 2] = (1 - h) * (2 * r[:, 3] - 1)
    return theta


def augment(x, theta, data):
    """uint8 images (b, C, H, W) -> normalised float crops, in one batched resampling."""
    x = normalize(x, data)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

# -----------------------------------------------------------------------------
# models, checkpoints, evaluation, pictures


def model_config(args, data):
    """The preset with the flags' model fields, for the data's image size, channels and classes."""
    c, h = data.x.shape[1:3]
    try:
        return star.make_config(args.preset, img_size=h, in_chans=c, num_classes=data.num_classes,
                                **args.overrides)
    except ValueError as e:
        try:
            cfg = star.make_config(args.preset, **args.overrides)
        except ValueError as flags:  # the flags themselves are wrong, whatever the data
            raise UserError(f"model flags: {flags}") from None
        raise UserError(f"the images of {data.name} are {h}x{h} px, which the model cannot take "
                        f"({e}); pass --img_size with a multiple of patch*cluster = "
                        f"{cfg.patch * cfg.cluster} to resize them, or another --patch or --cluster"
                        ) from None


def load_checkpoint(path, phase=None):
    """A checkpoint of train.py; of that phase, if given."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    try:  # our own files; older ones hold numpy's RNG state
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or not a torch file: the errors vary
        raise UserError(f"cannot read {path} as a checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or not {"phase", "config", "model"} <= set(ckpt):
        raise UserError(f"{path} is not a checkpoint written by train.py")
    if phase and ckpt["phase"] != phase:
        hint = " (evaluate it with --mode eval)" if ckpt["phase"] != "pretrain" else ""
        raise UserError(f"{path} is a {ckpt['phase']} checkpoint; this needs a {phase} one{hint}")
    return ckpt


def check_config(saved, cfg, names, what):
    """Raise a UserError naming every field in names where a checkpoint's config or flags differ."""
    diff = [f"{n}={saved.get(n)!r} there, {getattr(cfg, n)!r} here"
            for n in names if saved.get(n) != getattr(cfg, n)]
    if diff:
        raise UserError(f"{what} was made with other flags or model config: {'; '.join(diff)}. "
                        f"Pass the same --preset and flags as the run that wrote it")


def evaluate(model, data, args, env, by_slot=False):
    """Test loss (the STAR objective or cross-entropy) and accuracy, over the whole test split;
    by_slot: a pretraining model's loss also by image slot (1..K) and cluster (an image's first, or
    the rest), to show where the separator acts: printed, and as {"loss_slot{k}_{part}": mean}."""
    sums, n = loss_sums(model, data, args, env)
    if isinstance(model, star.StarClassifier):
        return {"test_loss": sums[0].item() / n, "test_acc": sums[1].item() / n}
    metrics = {"test_loss": sums.mean().item() / n}
    if not by_slot:
        return metrics
    rows = model.loss_by_slot(sums / n)  # the mean loss per target of each slot and part
    cells = {(r["slot"], r["part"]): f"{r['loss']:.4f} ({r['targets']})" for r in rows}
    print_slots(f"AR test loss by image slot (K={model.cfg.images_per_seq}, separator "
                f"{model.cfg.separator}), targets per sequence in parentheses:", cells, env)
    return metrics | {f"loss_slot{r['slot']}_{r['part']}": r["loss"] for r in rows}


@torch.no_grad()
def loss_sums(model, data, args, env):
    """Sums over the test split and the ranks: (loss, correct) (2,) of a classifier, or the loss of
    each target (Q,) of a pretraining model; and n, the images or sequences of K summed over."""
    classify = isinstance(model, star.StarClassifier)
    unit = 1 if classify else model.cfg.images_per_seq
    if len(data.x_test) < unit:
        raise UserError(f"the test split has {len(data.x_test)} image(s), fewer than one sequence "
                        f"of K={unit}: use --num_test {unit} or more")
    n = len(data.x_test) // unit  # images, or sequences of K images
    per = -(-n // env.world) * unit  # images per rank
    end = min(n * unit, (env.rank + 1) * per)
    size = max(args.batch_size // unit, 1) * unit
    sums = torch.zeros(2 if classify else len(model.target), device=env.device,
                       dtype=torch.float64)  # (2,): loss, correct; or (Q,): the loss of each target
    model.eval()
    for s in range(env.rank * per, end, size):
        x = normalize(data.x_test[s:min(s + size, end)], data)
        y = data.y_test[s:min(s + size, end)]
        with autocast(env):
            out = model(x) if classify else model.predict(x)
        if classify:
            sums[0] += F.cross_entropy(out.float(), y, reduction="sum")
            sums[1] += (out.argmax(1) == y).sum()
        else:  # every target's loss (Q,), summed over the sequences
            sums += star.next_cluster_loss(*out, per_target=True).double().sum(0)
    model.train()
    if env.ddp:
        dist.all_reduce(sums)
    return sums, n


def interference(model, data, clean, args, env):
    """Does the separator shield an image from what came before? The AR test loss of the images in
    slots 2, 4, ... after a distractor (with_distractors), next to their loss after their real
    predecessors (clean: evaluate's by_slot metrics), printed; {"loss_slot{k}_{part}_{kind}"}."""
    x_test = with_distractors(data.x_test, model.cfg.images_per_seq, args.distractor)
    sums, n = loss_sums(model, SimpleNamespace(**vars(data) | {"x_test": x_test}), args, env)
    rows = [r for r in model.loss_by_slot(sums / n) if r["slot"] % 2 == 0]
    keys = [f"loss_slot{r['slot']}_{r['part']}" for r in rows]
    cells = {(r["slot"], r["part"]): f"{clean[key]:.4f} -> {r['loss']:.4f}"
             for r, key in zip(rows, keys)}
    print_slots(f"AR test loss after a distractor ({args.distractor} in slots 1, 3, ...), "
                f"real predecessor -> distractor:", cells, env)
    return {f"{key}_{args.distractor}": r["loss"] for r, key in zip(rows, keys)}


def with_distractors(x, K, kind):
    """uint8 images (n, C, H, W) in sequences of K, those in slots 1, 3, ... replaced by uniform
    noise pixels or by built-in shapes (their first C channels); the same ones every time."""
    x = x.clone()
    replaced = torch.arange(len(x), device=x.device) % K % 2 == 0  # (n,): slots 1, 3, ...
    if kind == "noise":
        gen = torch.Generator(x.device).manual_seed(0)
        x[replaced] = torch.randint_like(x[replaced], 256, generator=gen)  # (m, C, H, W)
    else:  # shapes: seeds 0 and 1 are the synthetic data's own splits
        m, c, size, _ = x[replaced].shape
        x[replaced] = synthetic_shapes(m, size, seed=2)[0][:, :c].to(x.device)  # (m, C, H, W)
    return x


def print_slots(title, got, env):
    """Print title and a line per image slot in got {(slot, "first" or "rest"): text}, - if none."""
    lines = [title, "  slot  first cluster     other clusters"]
    for k in sorted({slot for slot, _ in got}):
        lines.append(f"  {k:4d}  {got.get((k, 'first'), '-'):<16s}  {got.get((k, 'rest'), '-')}")
    if env.master:
        print("\n".join(lines), flush=True)


@torch.no_grad()
def complete_lower_half(model, imgs):
    """Fill in the lower half of every image from its upper half, cluster by cluster in sequence
    order. The model is causal: its prediction for a cluster reads only what comes before it in
    sequence (the image's upper half, the clusters written in so far, the earlier images of the
    sequence), so we run it on the current images, write its prediction for the next cluster in, and
    repeat. imgs (b, C, H, W) normalised, b divisible by K."""
    cfg = model.cfg
    K = cfg.images_per_seq
    cc = cfg.cluster ** 2
    N = cfg.num_patches
    per_row = cfg.grid // cfg.cluster
    first = max(per_row // 2, 1) * per_row  # the lower half's first cluster (raster order)
    row_of = torch.full((K * N,), -1, dtype=torch.long, device=imgs.device)  # position -> pred row
    row_of[model.target] = torch.arange(len(model.target), device=imgs.device)
    patches = star.patchify(imgs, cfg.patch)  # (b, N, p*p*C) raster order
    upper = patches[:, model.order[:first * cc]]  # (b, first*cc, p*p*C)
    # the loss normalises every target patch, so predictions carry no mean or scale of their own:
    # we de-normalise them with the average mean and std of the same image's upper-half patches
    mean = upper.mean(-1).mean(1)[:, None, None]  # (b, 1, 1)
    std = upper.std(-1).mean(1)[:, None, None]  # (b, 1, 1)
    patches[:, model.order[first * cc:]] = mean  # grey until written
    for k in range(K):  # image k of every sequence
        for j in range(first, N // cc):
            images = star.unpatchify(patches, cfg.patch, cfg.in_chans)
            pred, _ = model.predict(images)  # (b/K, Q, p*p*C)
            pos = torch.arange(j * cc, (j + 1) * cc, device=imgs.device)  # cluster j in its image
            pred_j = pred[:, row_of[k * N + pos]].float()  # (b/K, cc, p*p*C)
            patches[k::K, model.order[pos]] = pred_j * std[k::K] + mean[k::K]
    return star.unpatchify(patches, cfg.patch, cfg.in_chans)


GRID_SCALE = 3  # nearest-neighbour enlargement: a 32 px image shows as 96 px
GRID_MARGIN = 80  # left margin for the row labels, px


@torch.no_grad()
def sample_grid(model, data, args, env, path, pad=2):
    """A PNG of three labelled rows of test images: as they are, the teacher-forced predictions,
    the lower halves completed; each image enlarged GRID_SCALE times."""
    from PIL import Image, ImageDraw
    K = model.cfg.images_per_seq
    n = min(-(-args.num_samples // K) * K, len(data.x_test) // K * K)
    if n == 0:
        return
    imgs = normalize(data.x_test[:n], data)
    model.eval()
    with autocast(env):
        rows = [imgs, model.predicted_images(imgs).float(), complete_lower_half(model, imgs)]
    model.train()
    rows = [(r * data.std + data.mean).clamp(0, 1).cpu() for r in rows]
    big = torch.cat([F.interpolate(r, scale_factor=GRID_SCALE, mode="nearest") for r in rows])
    grid = make_grid(big, nrow=n, padding=pad, pad_value=1.0)  # (3, H, W)
    grid = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    page = Image.new("RGB", (GRID_MARGIN + grid.width, grid.height), "white")
    page.paste(grid, (GRID_MARGIN, 0))
    side = big.shape[-1] + pad
    draw = ImageDraw.Draw(page)
    for i, label in enumerate(("input", "predicted", "completed")):
        draw.text((4, pad + i * side + side // 2 - 6), label, fill="black")
    page.save(path)

# -----------------------------------------------------------------------------
# the training loop, shared by pretraining, finetuning and probing


def param_groups(model, weight_decay, layer_decay=1.0):
    """AdamW groups: no decay on 1-D params (norms, biases, D), A_log and the learned tokens;
    an lr scale per layer (patch embedding 0, blocks 1..depth, the rest depth + 1)."""
    depth = len(model.encoder.blocks)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = (p.dim() < 2 or name.endswith(("bias", "A_log", ".D"))
                    or name in ("separator", "query"))
        layer = depth + 1
        if name.startswith("encoder.patch_embed"):
            layer = 0
        elif name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        scale = layer_decay ** (depth + 1 - layer)
        new = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        groups.setdefault((no_decay, scale), new)["params"].append(p)
    return list(groups.values())


def train_phase(name, model, data, args, env):
    """Train model for its phase's epochs (AdamW, warm-up then cosine), evaluating, logging and
    checkpointing every epoch; --resume goes on after the last epoch saved. Returns the history:
    one dict per epoch, the first before any training."""
    env.phase = name
    pre = name == "pretrain"  # else a classifier: finetune, scratch or probe
    B = args.batch_size
    steps = len(data.x) // B  # the last incomplete batch is dropped
    epochs = args.pretrain_epochs if pre else args.finetune_epochs
    warmup = args.warmup_epochs if pre else args.ft_warmup_epochs
    phase = SimpleNamespace(name=name, path=os.path.join(args.out, f"{name}.pt"), model=model,
                            classify=not pre, epochs=epochs, steps=steps, total=epochs * steps,
                            lr=(args.lr if pre else args.ft_lr) * B / 256,
                            warmup=round(warmup * steps),
                            min_scale=args.min_scale if pre else args.ft_min_scale)
    groups = param_groups(model, args.weight_decay, 1.0 if pre else args.layer_decay)
    betas = (0.9, 0.95) if pre else (0.9, 0.999)
    phase.optimizer = torch.optim.AdamW(groups, betas=betas)  # the lr is set at every step
    phase.scaler = torch.amp.GradScaler(env.device.type, enabled=env.dtype == torch.float16)
    phase.gen = torch.Generator(env.device).manual_seed(args.seed)  # crops and flips, every rank
    phase.ema = None  # the averaged weights, evaluated and saved in their place
    if not pre and args.ema > 0:
        phase.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema))
    torch.manual_seed(args.seed + env.rank)  # drop-path masks
    start = 0
    if args.resume and os.path.exists(phase.path):
        start, history = restore(phase, args, env)
    else:
        rec = {"phase": name, "epoch": 0, "step": 0} | evaluate_phase(phase, 0, data, args, env)
        history = [log_line(rec, args, env)]
    ddp_model = model
    if env.ddp:
        ddp_model = DDP(model, device_ids=[env.device] if env.device.type == "cuda" else None)
    phase.warm_up = 0  # when compiling: the time the first step began
    if args.compile == "on" or (args.compile == "auto" and env.device.type == "cuda"):
        if env.device.type == "cuda":  # build the scan kernel now: a build in the trace splits it
            star._cuda_kernel()
        # one graph of fixed shapes (train_epoch drops the last partial batch); evaluation, the EMA
        # and the checkpoints keep the plain model, whose state dict has no _orig_mod. prefixes
        mode = compile_mode(pre, env)
        ddp_model = torch.compile(ddp_model, dynamic=False, mode=mode)
        log.info(f"{name}: torch.compile ({mode}) of the training step; the first step compiles it")
        phase.warm_up = time.time()
    for epoch in range(start, epochs):
        t0 = time.time()
        loss, lr = train_epoch(phase, ddp_model, epoch, data, args, env)
        rec = {"phase": name, "epoch": epoch + 1, "step": (epoch + 1) * steps, "loss": loss,
               "lr": lr, "img_per_s": round(steps * B / (time.time() - t0), 1)}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == epochs:
            rec |= evaluate_phase(phase, epoch + 1, data, args, env)
        history.append(log_line(rec, args, env))
        save_checkpoint(phase, epoch + 1, history, data, args, env)
    return history


def compile_mode(pre, env):
    """torch.compile's mode: CUDA graphs for pretraining on one GPU, its step's kernels replayed
    in one launch (cifar at 512 images, H200: 26,033 images/s, 10,154 in the default mode, which
    is launch-bound); the default mode for the classifier (13,983 at 512, 14,844 at 1024), DDP
    and CPUs."""
    return "reduce-overhead" if pre and env.device.type == "cuda" and not env.ddp else "default"


def check_batch(name, n, cfg, args, env):
    """Refuse a --batch_size that a phase's n training images or the processes cannot split."""
    B = args.batch_size
    unit = cfg.images_per_seq if name == "pretrain" else 1
    if B % (env.world * unit):
        raise UserError(f"--batch_size {B} must split into {env.world} equal shares of whole "
                        f"sequences of {unit} image(s): use a multiple of {env.world * unit}")
    if n < B:
        fewer = f" (--labeled {args.labeled})" if name != "pretrain" and args.labeled else ""
        raise UserError(f"{name} would train on {n} images{fewer}, fewer than --batch_size {B}")


def train_epoch(phase, model, epoch, data, args, env):
    """One pass over the training set, a training step per global batch; returns the mean loss and
    the last lr. model is phase.model, in DDP under torchrun: each rank takes a share of a batch."""
    B = args.batch_size
    lo = env.rank * B // env.world
    hi = (env.rank + 1) * B // env.world
    order = torch.Generator().manual_seed(args.seed * 100_003 + epoch)  # the same on every rank
    perm = torch.randperm(len(data.x), generator=order).to(env.device)
    losses = torch.zeros(phase.steps, device=env.device)  # read back at log points, not every step
    seen = []  # the losses read back so far
    bar = tqdm(total=phase.steps * B, unit="img", desc=f"{phase.name} {epoch + 1}/{phase.epochs}",
               disable=not (env.master and args.progress), dynamic_ncols=True)
    for i in range(phase.steps):
        step = epoch * phase.steps + i
        lr = lr_at(step, phase.lr, phase.warmup, phase.total)
        for group in phase.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        idx = perm[i * B:(i + 1) * B][lo:hi]
        crops = random_crops(B, phase.gen, phase.min_scale)[lo:hi]  # drawn for all B: same stream
        x = augment(data.x[idx], crops, data)  # (B / world, C, H, W)
        if phase.classify:  # labels (b,), or with --mixup, --cutmix label shares (b, classes)
            x, y = mix(x, data.y[idx], phase.model.cfg.num_classes, args, step)
        with autocast(env):
            out = model(x)  # pretraining: the STAR loss; finetuning: logits (b, classes)
        loss = out
        if phase.classify:
            loss = F.cross_entropy(out.float(), y, label_smoothing=args.label_smoothing)
        phase.optimizer.zero_grad(set_to_none=True)
        phase.scaler.scale(loss).backward()
        if not phase.classify and args.clip_grad > 0:  # ARM clips pretraining, not finetuning
            phase.scaler.unscale_(phase.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        phase.scaler.step(phase.optimizer)
        phase.scaler.update()
        if phase.ema is not None:
            phase.ema.update_parameters(phase.model)
        losses[i] = loss.detach()
        if phase.warm_up:  # the first compiled step: say how long compiling took
            loss.item()  # wait for the step
            log.info(f"{phase.name}: first step compiled in {time.time() - phase.warm_up:.0f} s")
            phase.warm_up = 0
        bar.update(B)
        if (i + 1) % args.log_every == 0 or i + 1 == phase.steps:
            seen += check_losses(losses[len(seen):i + 1], len(seen), epoch, phase, env)
            bar.set_postfix(loss=f"{seen[-1]:.4f}", lr=f"{lr:.2e}")
    bar.close()
    return sum(seen) / len(seen), lr


def mix(x, y, num_classes, args, step):
    """Mixup or cutmix (ARM finetunes with both): each image and its label blended with another
    image of the batch; one of the two per step when both are on. The draws depend on the seed and
    step only: the same on every rank and after --resume. Off: x and y as they came."""
    kinds = [(kind, a) for kind, a in (("mixup", args.mixup), ("cutmix", args.cutmix)) if a > 0]
    if not kinds:
        return x, y
    rng = np.random.default_rng([args.seed, step])
    kind, alpha = kinds[rng.integers(len(kinds))]
    lam = rng.beta(alpha, alpha)  # the share of the image's own label
    perm = torch.from_numpy(rng.permutation(len(x))).to(x.device)  # each image's partner
    if kind == "mixup":
        x = lam * x + (1 - lam) * x[perm]  # (b, C, H, W)
    else:  # paste a square of the partner covering about 1 - lam of the image
        side = x.shape[-1]
        cut = round(side * math.sqrt(1 - lam))
        top, left = rng.integers(0, side - cut + 1, size=2)
        x = x.clone()
        x[..., top:top + cut, left:left + cut] = x[perm, :, top:top + cut, left:left + cut]
        lam = 1 - cut ** 2 / side ** 2  # the share actually kept
    target = F.one_hot(y, num_classes).float()  # (b, classes)
    return x, lam * target + (1 - lam) * target[perm]


def lr_at(step, lr, warmup, total):
    """Linear warm-up over the first warmup steps, then cosine decay to 0 at step total."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def check_losses(losses, first, epoch, phase, env):
    """The losses of batches first.. of this epoch, averaged over the ranks, read back; one that is
    not finite stops the run (on every rank: all see the same)."""
    losses = losses.clone()
    if env.ddp:
        dist.all_reduce(losses, op=dist.ReduceOp.AVG)
    losses = losses.tolist()
    bad = [j for j, v in enumerate(losses) if not math.isfinite(v)]
    if bad:
        batch = first + bad[0] + 1  # counting from 1
        kept = (f"{phase.path} keeps the last good state (epoch {epoch}): lower --lr, then --resume"
                if os.path.exists(phase.path) else "No checkpoint was written yet.")
        raise SystemExit(f"{phase.name}: the loss became {losses[bad[0]]} at step "
                         f"{epoch * phase.steps + batch} (epoch {epoch + 1}, batch {batch}); "
                         f"stopped. {kept}")
    return losses


def evaluate_phase(phase, epoch, data, args, env):
    """The test metrics (of the EMA weights with --ema); pretraining also draws a sample grid."""
    metrics = evaluate(phase.model if phase.ema is None else phase.ema.module, data, args, env)
    if not phase.classify and env.master:
        path = os.path.join(args.out, f"samples_{phase.name}_e{epoch:03d}.png")
        sample_grid(phase.model, data, args, env, path)
    return metrics


def log_line(rec, args, env):
    """Print rec in one line and append it to log.jsonl (rank 0); return it."""
    if env.master:
        words = (f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items())
        log.info(" ".join(words))
        with open(os.path.join(args.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
    return rec


def save_checkpoint(phase, epoch, history, data, args, env):
    """All a resumed run needs to go on exactly, written atomically (a temporary file, then
    os.replace): a Ctrl-C or a full disk keeps the last checkpoint."""
    # torch's streams only: nothing draws from numpy's or Python's global ones (mix seeds its own)
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if env.device.type == "cuda" else None}
    rngs = [rng]
    if env.ddp:  # every rank's streams, so that a resumed multi-GPU run goes on exactly too
        rngs = [None] * env.world
        dist.all_gather_object(rngs, rng)
    if env.master:
        ckpt = {"phase": phase.name, "model": phase.model.state_dict(),
                "optimizer": phase.optimizer.state_dict(), "scaler": phase.scaler.state_dict(),
                "config": asdict(phase.model.cfg), "args": asdict(args),
                "norm": [data.mean.cpu(), data.std.cpu()], "epoch": epoch,
                "step": epoch * phase.steps, "rng": rngs, "aug_rng": phase.gen.get_state(),
                "history": history, "ema": None if phase.ema is None else phase.ema.state_dict()}
        try:
            torch.save(ckpt, phase.path + ".tmp")
            os.replace(phase.path + ".tmp", phase.path)
        except (OSError, RuntimeError) as e:  # disk full: torch reports it as either
            if os.path.exists(phase.path + ".tmp"):
                os.remove(phase.path + ".tmp")
            kept = "was not written yet"
            if os.path.exists(phase.path):
                kept = "keeps the last good state"
            raise UserError(f"could not write {phase.path} ({e}); it {kept}. Free some disk space, "
                            f"then run the same command with --resume") from None
    if env.ddp:
        dist.barrier()  # no rank reads the file (the next phase's --init) before it is written


def restore(phase, args, env):
    """Put the model, optimizer and every random stream back as they were at the end of the epoch
    saved in phase.path; return that epoch and the history so far."""
    ckpt = load_checkpoint(phase.path, phase.name)
    names = [f.name for f in fields(star.StarConfig)]
    check_config(ckpt["config"], phase.model.cfg, names, phase.path)
    flags = FINETUNE_FLAGS if phase.classify else PRETRAIN_FLAGS
    check_config(ckpt["args"], args, RESUMED + flags, phase.path)
    phase.model.load_state_dict(ckpt["model"])
    phase.optimizer.load_state_dict(ckpt["optimizer"])
    phase.scaler.load_state_dict(ckpt["scaler"])
    if phase.ema is not None:
        phase.ema.load_state_dict(ckpt["ema"])
    phase.gen.set_state(ckpt["aug_rng"])
    if len(ckpt["rng"]) != env.world:
        log.warning(f"{phase.path} was written by {len(ckpt['rng'])} processes, now {env.world}: "
                    f"random streams differ")
    rng = ckpt["rng"][min(env.rank, len(ckpt["rng"]) - 1)]
    torch.set_rng_state(rng["torch"])  # older checkpoints also hold numpy's and Python's: unused
    if rng["cuda"] is not None and env.device.type == "cuda":
        torch.cuda.set_rng_state_all(rng["cuda"])
    log.info(f"resuming {phase.path} after epoch {ckpt['epoch']} (step {ckpt['step']})")
    return ckpt["epoch"], ckpt["history"]

# -----------------------------------------------------------------------------
# the phases and the report


def make_model(name, cfg, args, env):
    """The model of a phase: pretraining's, or a classifier from scratch or from a pretraining
    checkpoint (finetune, probe); the probe trains only its norm and head (a linear probe)."""
    torch.manual_seed(args.seed)
    if name == "pretrain":
        model = star.StarPretrain(cfg).to(env.device)
        log.info(f"pretraining {star.count_params(model) / 1e6:.2f}M parameters: "
                 f"K={cfg.images_per_seq} images per sequence, separator {cfg.separator}, "
                 f"{cfg.seq_len} tokens")
        return model
    cfg = replace(cfg, drop_path=0.0 if name == "probe" else args.ft_drop_path)
    model = star.StarClassifier(cfg).to(env.device)
    own = os.path.join(args.out, "pretrain.pt")  # mode all: this run's pretraining
    init = {"finetune": own if args.mode == "all" else args.init, "probe": args.init or own,
            "scratch": ""}[name]
    if init and not (args.resume and os.path.exists(os.path.join(args.out, f"{name}.pt"))):
        ckpt = load_checkpoint(init, "pretrain")
        check_config(ckpt["config"], cfg, SHAPE_FIELDS, init)
        missing, unexpected = model.load_pretrained(ckpt["model"])
        log.info(f"{name}: weights from {init}; missing keys: {key_heads(missing)}; "
                 f"unexpected keys: {key_heads(unexpected)}")
    elif not init:
        log.info(f"{name}: from scratch")
    if name == "probe":
        model.encoder.requires_grad_(False)
    return model


def key_heads(keys):
    """State-dict keys counted by their first name: 'head (2), norm (2)'."""
    counts = collections.Counter(k.split(".")[0] for k in keys)
    return ", ".join(f"{head} ({n})" for head, n in counts.items()) or "none"


def evaluate_checkpoint(data, args, env):
    """Mode eval: the model is the checkpoint's (model flags must agree); the data must fit it."""
    ckpt = load_checkpoint(args.init)
    check_config(ckpt["config"], SimpleNamespace(**args.overrides), args.overrides, args.init)
    cfg = star.StarConfig(**ckpt["config"])
    c, h, w = data.x.shape[1:]
    fits = (c, h, w) == (cfg.in_chans, cfg.img_size, cfg.img_size)
    pretrained = ckpt["phase"] == "pretrain"  # its loss reads no labels: any number of classes
    if not fits or cfg.num_classes < data.num_classes and not pretrained:
        raise UserError(f"{data.name} ({c} x {h} x {w} images, {data.num_classes} classes) does "
                        f"not fit the model of {args.init} ({cfg.in_chans} x {cfg.img_size} x "
                        f"{cfg.img_size}, {cfg.num_classes} classes); --img_size {cfg.img_size} "
                        f"resizes the images")
    if args.distractor != "none" and (not pretrained or cfg.images_per_seq < 2):
        raise UserError(f"--distractor needs a pretraining checkpoint of K >= 2 images per "
                        f"sequence; {args.init} is a {ckpt['phase']} one of K={cfg.images_per_seq}")
    model = (star.StarPretrain if pretrained else star.StarClassifier)(cfg).to(env.device)
    weights = ckpt["model"]
    if ckpt.get("ema"):  # --ema: the averaged weights, as the run evaluated them
        weights = {k[7:]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    model.load_state_dict(weights)
    data.mean, data.std = (t.to(env.device) for t in ckpt["norm"])  # normalise as in training
    metrics = evaluate(model, data, args, env, by_slot=True)
    if args.distractor != "none":
        metrics |= interference(model, data, metrics, args, env)
    if pretrained and env.master:
        sample_grid(model, data, args, env, os.path.join(args.out, "samples_eval.png"))
    return log_line({"phase": "eval", "checkpoint": args.init} | metrics, args, env)


def run(args, env):
    """The phases of args.mode, then the report; mode eval evaluates --init instead."""
    phases = {"all": ["pretrain", "finetune"] + ["scratch"] * args.compare_scratch,
              "eval": []}.get(args.mode, [args.mode])  # the other modes: that one phase
    taken = [f"{p}.pt" for p in phases if os.path.exists(os.path.join(args.out, f"{p}.pt"))]
    if taken and not args.resume:
        raise UserError(f"{args.out} already holds {', '.join(taken)}: pass --resume to continue "
                        f"that run, or --out to start another")
    if phases and args.resume and not taken:
        raise UserError(f"--resume: {args.out} holds no checkpoint, so nothing to resume there")
    t0 = time.time()
    data = load_data(args, env)
    if args.mode == "eval":
        return evaluate_checkpoint(data, args, env)
    cfg = model_config(args, data)
    # semi-supervised: pretraining reads every training image without its label, finetuning the
    # first --labeled ones (a random sample: read_splits); mean and std stay those of all
    n = args.labeled or None
    labeled = SimpleNamespace(**vars(data) | {"x": data.x[:n], "y": data.y[:n]})
    for name in phases:  # before any training: a finetuning refused after pretraining wastes it
        check_batch(name, len((data if name == "pretrain" else labeled).x), cfg, args, env)
    h = {}
    for name in phases:
        model = make_model(name, cfg, args, env)
        h[name] = train_phase(name, model, data if name == "pretrain" else labeled, args, env)
    summary = {"data": data.name, "train": len(data.x), "test": len(data.x_test),
               "labeled": len(labeled.x), "preset": args.preset,
               "minutes": round((time.time() - t0) / 60, 2)}
    if "pretrain" in h:
        summary |= {"K": cfg.images_per_seq, "separator": cfg.separator,
                    "ar_loss_before": h["pretrain"][0]["test_loss"],
                    "ar_loss_after": h["pretrain"][-1]["test_loss"]}
    summary |= {f"{p}_acc": h[p][-1]["test_acc"] for p in h if p != "pretrain"}
    if env.master:
        report(summary, cfg, args)
        log_line({"summary": summary}, args, env)
    return summary


def report(s, cfg, args):
    """What a learner reads at the end: one screen, the numbers that say if pretraining paid off."""
    size = f"{cfg.in_chans}x{cfg.img_size}x{cfg.img_size}"
    lines = [f"\nSTAR on {s['data']}: {s['train']} training and {s['test']} test images of {size}, "
             f"preset {s['preset']}, seed {args.seed}"]
    if "ar_loss_before" in s:
        lines.append(f"  pretraining on all {s['train']} training images, without labels: "
                     f"{args.pretrain_epochs} epochs (K={s['K']}, separator {s['separator']})")
        lines.append(f"    AR loss (test)    {s['ar_loss_before']:.4f} before, "
                     f"{s['ar_loss_after']:.4f} after")
    init = "the pretraining" if args.mode == "all" else args.init or "scratch"
    names = {"finetune": f"finetuned from {init}", "scratch": "from scratch",
             "probe": f"linear probe of {init}"}
    accs = [(s[f"{p}_acc"], what) for p, what in names.items() if f"{p}_acc" in s]
    if accs:
        both = ", the same recipe for both:" if "scratch_acc" in s else ":"
        lines.append(f"  finetuning on {s['labeled']} labelled training images, "
                     f"{args.finetune_epochs} epochs{both}")
    lines += [f"    test accuracy     {100 * acc:.1f}%  {what}" for acc, what in accs]
    if "finetune_acc" in s and "scratch_acc" in s:
        gain = 100 * (s["finetune_acc"] - s["scratch_acc"])
        lines.append(f"    pretraining adds  {gain:+.1f} points")
    grid = os.path.join(args.out, f"samples_pretrain_e{args.pretrain_epochs:03d}.png")
    if "ar_loss_before" in s and os.path.isfile(grid):
        lines.append(f"  pictures: {grid} (input, predicted, completed)")
    lines.append(f"  {s['minutes']} minutes; run folder {args.out}")
    print("\n".join(lines), flush=True)


def main(argv=None):
    """Parse, check, run. A user error: one line on stderr, exit status 2 (STAR_DEBUG=1: raise)."""
    args = parse_args(argv)
    env = None
    try:
        check_args(args)
        env = setup(args)
        return run(args, env)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM: the last checkpoint of each phase stays
        raise SystemExit(f"interrupted: {args.out} keeps every finished epoch; continue with the "
                         f"same command and --resume (it repeats the interrupted epoch)") from None
    except torch.cuda.OutOfMemoryError:
        raise SystemExit(f"out of GPU memory in {env.phase or 'setup'} at --batch_size "
                         f"{args.batch_size} ({args.batch_size // env.world} images per GPU): "
                         f"lower --batch_size (say to {args.batch_size // 2}); the checkpoints in "
                         f"{args.out} are kept, so --resume goes on") from None
    except UserError as e:
        if os.environ.get("STAR_DEBUG") == "1":
            raise
        print(f"train.py: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        if env and env.ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill stops like Ctrl-C
    main()
