"""
Times the selective scans on a GPU:
    python tests/bench.py [--out FILE] [--shapes small,tiny,B,long] [--dtypes f32,bf16,f16]
    [--impls cuda,official,torch,ref] [--official DIR]
    (DIR: a copy of state-spaces/mamba csrc/selective_scan, built here)
or on the CPU: python tests/bench.py --cpu
    (the PyTorch scan against the reference at (8, 192, 16, 272), float32)
or whole pretraining steps against K:
    python tests/bench.py --model [--presets cifar,base] [--ks 1,2,4,8,16]
    [--compile off,default,reduce-overhead]  (eager and torch.compile modes, each timed)
    [--batches 1024,512]  (each of these batches; default: the largest of 1024, 512, ... that fits)
Both GPU modes take [--star DIR]: DIR/star.py and its kernel instead of ours (e.g. an older
commit's: a before/after pair in one device call; give each its own TORCH_EXTENSIONS_DIR).
--profile: the first shape's forward+backward per impl under torch.profiler, and its mean over
200 back-to-back runs (one sync at the end: the fixed cost where the kernels take microseconds).
Forward and forward+backward with CUDA events (warm-up, then the median of many runs), and peak
memory above the inputs, for the CUDA kernel, star's PyTorch fallback, the sequential reference and
the official kernel (--official).
Inputs as in a Mamba layer: softplus with delta_bias, D, z, B and C (b, n, l).
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import star  # noqa: E402

SHAPES = {"small": (1, 16, 16, 64), "tiny": (128, 384, 16, 260), "B": (32, 768, 16, 580),
          "long": (4, 768, 16, 8192)}  # (b, d, n, l)
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def make_inputs(b, d, n, l, dtype):
    dev = "cuda"
    return dict(u=torch.randn(b, d, l, device=dev, dtype=dtype),
                # softplus(delta + bias) ~ 0.001-0.1
                delta=(0.5 * torch.rand(b, d, l, device=dev) - 4.0).to(dtype),
                A=-torch.rand(d, n, device=dev) * n,
                B=torch.randn(b, n, l, device=dev, dtype=dtype),
                C=torch.randn(b, n, l, device=dev, dtype=dtype),
                D=torch.randn(d, device=dev),
                z=torch.randn(b, d, l, device=dev, dtype=dtype),
                delta_bias=torch.rand(d, device=dev))


def load_official(folder):
    """JIT-build state-spaces/mamba's csrc/selective_scan (a copy in folder, never committed) for
    this GPU"""
    from torch.utils import cpp_extension
    cc = "%d%d" % torch.cuda.get_device_capability()
    sources = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                     if f.endswith((".cu", ".cpp")))
    flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "--expt-extended-lambda",
             "--use_fast_math", f"-gencode=arch=compute_{cc},code=sm_{cc}"]
    flags += [f"-U__CUDA_NO_{t}__" for t in ("HALF_OPERATORS", "HALF_CONVERSIONS",
                                               "BFLOAT16_OPERATORS", "BFLOAT16_CONVERSIONS",
                                               "BFLOAT162_OPERATORS", "BFLOAT162_CONVERSIONS")]
    return cpp_extension.load(name="official_selective_scan", sources=sources,
                              extra_include_paths=[folder], extra_cflags=["-O3", "-std=c++17"],
                              extra_cuda_cflags=flags)


class _OfficialScan(torch.autograd.Function):
    """the official kernel's fwd/bwd called as mamba_ssm's SelectiveScanFn calls them
    (no last state)"""
    ext = None

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        B4 = B.unsqueeze(1) if B.dim() == 3 else B  # (b, 1, n, l)
        C4 = C.unsqueeze(1) if C.dim() == 3 else C
        out, x, *rest = _OfficialScan.ext.fwd(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus)
        ctx.save_for_backward(u, delta, A, B4, C4, D, z, delta_bias, x, out)
        ctx.delta_softplus = delta_softplus
        ctx.squeeze = B.dim() == 3
        return rest[0] if z is not None else out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = _OfficialScan.ext.bwd(
            u, delta, A, B, C, D, z, delta_bias, dout.contiguous(), x,
            out if z is not None else None, None, ctx.delta_softplus, False)
        if ctx.squeeze:
            dB = dB.squeeze(1)
            dC = dC.squeeze(1)
        return du, ddelta, dA, dB, dC, dD, rest[0] if z is not None else None, ddelta_bias, None


def official_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    return _OfficialScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def time_ms(fn, warmup, reps):
    """median milliseconds of fn() over reps runs, timed with CUDA events"""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench(scan, x, warmup, reps):
    """(forward ms, forward+backward ms, peak MiB above the inputs) of scan on inputs x"""
    names = list(x)
    leaves = {k: v.detach().requires_grad_() for k, v in x.items()}
    dout = torch.randn_like(x["u"])

    def fwd():
        with torch.no_grad():
            scan(**x, delta_softplus=True)

    def fwd_bwd():
        out = scan(**leaves, delta_softplus=True)
        torch.autograd.grad(out, [leaves[k] for k in names], dout)

    f = time_ms(fwd, warmup, reps)
    fb = time_ms(fwd_bwd, warmup, reps)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    return f, fb, (torch.cuda.max_memory_allocated() - base) / 2**20


def profile(impls, shape, dtype_names, runs=200):
    """Where a forward+backward's time goes: torch.profiler's table of each impl, and the mean of
    runs back-to-back calls"""
    from torch.profiler import ProfilerActivity
    for dtype_name in dtype_names:
        torch.manual_seed(0)
        x = make_inputs(*shape, DTYPES[dtype_name])
        leaves = {k: v.detach().requires_grad_() for k, v in x.items()}
        dout = torch.randn_like(x["u"])
        for name, scan in impls.items():
            def fwd_bwd():
                out = scan(**leaves, delta_softplus=True)
                torch.autograd.grad(out, list(leaves.values()), dout)
            for _ in range(20):
                fwd_bwd()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(runs):
                fwd_bwd()
            torch.cuda.synchronize()
            mean_us = (time.perf_counter() - t) / runs * 1e6
            acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as prof:
                for _ in range(20):
                    fwd_bwd()
                torch.cuda.synchronize()
            print(f"\n{name}, {shape}, {dtype_name}: {mean_us:.1f} us per forward+backward "
                  f"({runs} back to back); profile of 20:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def cpu_bench(b=8, d=192, n=16, l=272, reps=5):
    """forward and forward+backward on the CPU, median of reps (wall clock)"""
    torch.manual_seed(0)

    def r(*s):
        return torch.randn(*s).requires_grad_()

    x = dict(u=r(b, d, l), delta=r(b, d, l), A=(-torch.rand(d, n) - 0.1).requires_grad_(),
             B=r(b, n, l), C=r(b, n, l), D=r(d), z=r(b, d, l), delta_bias=r(d))
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"(b, d, n, l) = {(b, d, n, l)}, float32")
    for name, scan in (("torch (star fallback)", star.selective_scan_torch),
                       ("ref (sequential)", star.selective_scan_ref)):
        fwd = []
        fwd_bwd = []
        for _ in range(reps):
            t0 = time.perf_counter()
            out = scan(**x, delta_softplus=True)
            t1 = time.perf_counter()
            out.sum().backward()
            fwd.append(t1 - t0)
            fwd_bwd.append(time.perf_counter() - t0)
        print(f"{name}: fwd {1e3 * statistics.median(fwd):.1f} ms, "
              f"fwd+bwd {1e3 * statistics.median(fwd_bwd):.1f} ms")


def model_bench(presets, ks, backends, dirs, dtype, modes=("off",), steps=10, batches=None):
    """Images/s and peak memory per image of whole training steps (forward, backward, AdamW):
    pretraining against K, then the finetuning classifier against its number of scan directions;
    each eager (mode off) and torch.compile'd in the other modes, with the warm-up's seconds (the
    three steps before timing: compiling, and in reduce-overhead mode recording CUDA graphs).

    The batch is each of batches, or the largest of 1024, 512, ... images that fits (at least K);
    autocast to dtype on a GPU.
    """
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}, {dtype}")
    print("| preset | step | tokens | scan | compile | batch | images/s | peak MiB per image "
          "| warm-up s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in presets:
        rows = [(f"pretrain K={K}", star.StarPretrain, star.make_config(preset, images_per_seq=K))
                for K in (ks if preset != "base" else [4])]
        rows += [(f"classifier, {s} scan dirs", star.StarClassifier,
                  star.make_config(preset, scan_dirs=s))
                 for s in dirs]
        for label, make, cfg in rows:
            unit = cfg.images_per_seq if make is star.StarPretrain else 1
            tokens = cfg.seq_len if make is star.StarPretrain else cfg.num_patches
            for backend, mode in [(b, m) for b in backends for m in modes]:
                os.environ["STAR_SCAN"] = backend
                if cuda and backend == "cuda":  # built in a trace, it would split the graph
                    star._cuda_kernel()
                row = f"| {preset} | {label} | {tokens} | {backend} | {mode} |"
                fits = [b for b in (1024, 512, 256, 128, 64, 32, 16, 8) if b % unit == 0]
                for tried in ([[b] for b in batches] if batches else [fits]):
                    for batch in tried:  # the first that fits
                        try:
                            rate, peak, warm = _time_steps(make(cfg), batch, device, steps,
                                                           dtype, mode)
                            break
                        except torch.cuda.OutOfMemoryError:
                            torch.cuda.empty_cache()
                    else:
                        print(f"{row} {tried[-1]} | out of memory | | |")
                        continue
                    print(f"{row} {batch} | {rate:.0f} | {peak / batch:.2f} | {warm:.1f} |",
                          flush=True)
    os.environ.pop("STAR_SCAN")


def _time_steps(model, batch, device, steps, dtype, mode="off"):
    torch.manual_seed(0)
    model = model.to(device)
    cfg = model.cfg
    start = time.perf_counter()
    if mode != "off":  # reset: each model is a new graph, past dynamo's limit of 8 per forward
        torch._dynamo.reset()
        model = torch.compile(model, mode=mode, dynamic=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    y = torch.randint(cfg.num_classes, (batch,), device=device)
    cuda = device == "cuda"
    for i in range(steps + 3):  # three warm-up steps: reduce-overhead records graphs on the 2nd
        if i == 3:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            warm = time.perf_counter() - start
            start = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=cuda and dtype != torch.float32):
            out = model(x)
        loss = out if out.dim() == 0 else torch.nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    if cuda:
        torch.cuda.synchronize()
    rate = steps * batch / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    del model, opt
    return rate, peak, warm


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--shapes", default="tiny,B,long")
    parser.add_argument("--dtypes", default="f32,bf16,f16")
    parser.add_argument("--impls", default="cuda,official,torch,ref", help="which scans to time")
    parser.add_argument("--official",
                        help="folder with state-spaces/mamba's csrc/selective_scan sources")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--profile", action="store_true",
                        help="profile the first shape's forward+backward of each impl")
    parser.add_argument("--cpu", action="store_true",
                        help="time the PyTorch scan and the reference on the CPU")
    parser.add_argument("--model", action="store_true",
                        help="time whole pretraining steps against K")
    parser.add_argument("--presets", default="cifar,base")
    parser.add_argument("--ks", default="1,2,4,8,16")
    parser.add_argument("--backends", default="cuda,torch")
    parser.add_argument("--dirs", default="1,2,4", help="--model: the classifier's scan directions")
    parser.add_argument("--precision", default="bf16",
                        help="--model: autocast dtype (bf16, fp16, fp32)")
    parser.add_argument("--batches", help="--model: time each of these batches, e.g. 1024,512")
    parser.add_argument("--star", help="time DIR/star.py (e.g. a worktree of an older commit) "
                                       "instead of this folder's")
    parser.add_argument("--compile", default="off",
                        help="--model: time each step eager (off) and/or torch.compile'd in these "
                             "modes, e.g. off,default,reduce-overhead")
    args = parser.parse_args()
    if args.cpu:
        return cpu_bench()
    if args.star:  # star.py of another folder, for a before/after pair in one device call
        global star
        sys.path.insert(0, os.path.abspath(args.star))
        del sys.modules["star"]
        import star
        print(f"star.py from {args.star}")
    if args.model:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16,
                 "fp32": torch.float32}[args.precision]
        ks = [int(k) for k in args.ks.split(",") if k]  # "": no pretraining row
        dirs = [int(s) for s in args.dirs.split(",") if s]  # "": no classifier row
        return model_bench(args.presets.split(","), ks, args.backends.split(","), dirs, dtype,
                           args.compile.split(","),
                           batches=args.batches and [int(b) for b in args.batches.split(",")])
    assert torch.cuda.is_available(), "bench.py needs a CUDA GPU"
    t = time.time()
    ext, why = star._cuda_kernel()
    build_s = time.time() - t
    wanted = args.impls.split(",")
    impls = {}
    if ext is not None and "cuda" in wanted:
        impls["cuda (ours)"] = star.selective_scan_cuda
    elif ext is None:
        print(f"the CUDA scan is unavailable: {why}")
    if args.official and "official" in wanted:
        t = time.time()
        _OfficialScan.ext = load_official(args.official)
        print(f"official kernel build/load: {time.time() - t:.1f} s")
        impls["official (mamba_ssm)"] = official_scan
    if "torch" in wanted:
        impls["torch (star fallback)"] = star.selective_scan_torch
    if "ref" in wanted:
        impls["ref (sequential)"] = star.selective_scan_ref

    lines = [f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"CUDA {torch.version.cuda}",
             f"extension build/load: {build_s:.1f} s (a cached build only loads)", "",
             "| shape (b, d, n, l) | dtype | impl | fwd ms | fwd+bwd ms | fwd GB/s "
             "| fwd+bwd speed-up vs ref | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for shape_name in args.shapes.split(","):
        b, d, n, l = SHAPES[shape_name]
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            torch.manual_seed(0)
            x = make_inputs(b, d, n, l, dtype)
            size = dtype.itemsize
            # read u, delta, z, B, C; write out
            min_bytes = 4 * b * d * l * size + 2 * b * n * l * size
            results = {}
            for name, scan in impls.items():
                slow = name.startswith(("torch", "ref"))
                if name.startswith("ref") and shape_name == "long":
                    continue  # minutes per run
                try:
                    results[name] = bench(scan, x, 1 if slow else 5, 3 if slow else args.reps)
                except torch.cuda.OutOfMemoryError:
                    results[name] = None
                torch.cuda.empty_cache()
            ref = results.get("ref (sequential)")
            for name, r in results.items():
                if r is None:
                    line = (f"| {shape_name} ({b}, {d}, {n}, {l}) | {dtype_name} | {name} "
                            "| out of memory | | | | |")
                else:
                    f, fb, mib = r
                    speedup = f"{ref[1] / fb:.0f}x" if ref else "n/a"
                    line = (f"| {shape_name} ({b}, {d}, {n}, {l}) | {dtype_name} | {name} "
                            f"| {f:.3f} | {fb:.3f} | {min_bytes / f / 1e6:.0f} | {speedup} "
                            f"| {mib:.0f} |")
                lines.append(line)
                print(line, flush=True)
    if args.profile:
        profile(impls, SHAPES[args.shapes.split(",")[0]], args.dtypes.split(","))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
