"""
STAR in one file: separators for autoregressive pretraining of a Vision Mamba.

Reading list
  - Liu et al., "Separators in Enhancing Autoregressive Pretraining for Vision Mamba" (STAR), arXiv 2603.03806, 2026
  - Ren et al., "Autoregressive Pretraining with Mamba in Vision" (ARM), ICLR 2025
  - Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023
  - Zhu et al., "Vision Mamba" (Vim), ICML 2024

Glossary (code name -> paper symbol)
  b          batch (images, or packed sequences)      l   sequence length (tokens)
  d          channels of the scan (d_inner)            n   state size per channel (d_state)
  g          groups of B and C (usually 1)             delta  Δ, the input-dependent step size
  A          (d, n) state matrix, diagonal, negative   B, C   input and output projections of the state
  D          skip connection u -> y                    z   gate: y * silu(z)
  u          scan input (after the causal conv)        h   state, (b, d, n) at every step
  patch      p x p pixels, one token                   cluster  c x c neighbouring patches, predicted together
  separator  the learnable tokens before every image   K   images packed into one sequence

The file reads bottom-up: the selective scan (reference, fast PyTorch fallback, CUDA loader), the Mamba mixer,
the MambaMLP block, the Vision Mamba encoder, separator packing, the next-cluster objective, the pretraining
model, the finetuning classifier, and the presets.
"""
import glob
import logging
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("star")

# -----------------------------------------------------------------------------
# Selective scan: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,  y_t = C_t h_t + D u_t,  out = y * silu(z)


def _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias):
    """Raise ValueError naming what was expected when the scan's inputs do not fit together."""
    if u.dim() != 3:
        raise ValueError(f"u must be (b, d, l), got shape {tuple(u.shape)}")
    b, d, l = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (d, n) = ({d}, n), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("delta", delta), ("z", z)):
        if t is not None and t.shape != u.shape:
            raise ValueError(f"{name} must have u's shape {tuple(u.shape)}, got {tuple(t.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3 and t.shape == (b, n, l):
            continue
        if t.dim() == 4 and t.shape[0] == b and t.shape[2:] == (n, l) and d % t.shape[1] == 0:
            continue
        raise ValueError(f"{name} must be (b, n, l) = ({b}, {n}, {l}) or (b, g, n, l) with d={d} divisible "
                         f"by g, got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (d,):
            raise ValueError(f"{name} must be (d,) = ({d},), got {tuple(t.shape)}")
    devices = {t.device for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all scan inputs must be on one device, got {sorted(map(str, devices))}")


def _grouped(M):
    """B or C as (b, g, n, l): the plain (b, n, l) form is one group."""
    return M.unsqueeze(1) if M.dim() == 3 else M


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The oracle: the recurrence one step at a time, with autograd doing the backward.

    Same semantics and shapes as the official selective_scan_ref (state-spaces/mamba,
    mamba_ssm/ops/selective_scan_interface.py): u, delta, z (b, d, l); A (d, n); B, C (b, n, l) or grouped
    (b, g, n, l), channel i reading group i // (d // g); D, delta_bias (d,). Math in float32 (float64 when the
    inputs are float64, so gradcheck can use it); output in u's dtype; last state (b, d, n) in the math dtype.
    Real weights only.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in, ft = u.dtype, torch.promote_types(u.dtype, torch.float32)
    b, d, l = u.shape
    u, delta, A = u.to(ft), delta.to(ft), A.to(ft)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ft)[:, None]  # (b, d, l)
    if delta_softplus:
        delta = F.softplus(delta)
    B = _grouped(B).to(ft).repeat_interleave(d // _grouped(B).shape[1], dim=1)  # (b, d, n, l)
    C = _grouped(C).to(ft).repeat_interleave(d // _grouped(C).shape[1], dim=1)  # (b, d, n, l)
    h = u.new_zeros(b, d, A.shape[1])  # (b, d, n)
    ys = []
    for t in range(l):
        dA = torch.exp(delta[:, :, t, None] * A)  # (b, d, n)
        h = dA * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[..., t]  # (b, d, n)
        ys.append((h * C[..., t]).sum(-1))  # (b, d)
    y = torch.stack(ys, dim=2)  # (b, d, l)
    out = y if D is None else y + D.to(ft)[:, None] * u
    if z is not None:
        out = out * F.silu(z.to(ft))
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out


def _scan_states(u, delta, A, B):
    """All states h_t of the recurrence, in place, one fused multiply-add per step.

    u, delta (b, l, d); A (d, n); B (b, l, g, n). Returns exp(ΔA) and h, both (b, l, d, n).
    """
    b, l, d = u.shape
    g, n = B.shape[2], B.shape[3]
    dA = (delta[..., None] * A).exp_()  # (b, l, d, n)
    h = ((delta * u).view(b, l, g, d // g, 1) * B[:, :, :, None, :]).view(b, l, d, n)  # Δ_t B_t u_t
    for t in range(1, l):
        h[:, t].addcmul_(dA[:, t], h[:, t - 1])  # h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t
    return dA, h


class _ScanCore(torch.autograd.Function):
    """y_t = C_t h_t and the last state, with a hand-written backward that recomputes the states.

    Autograd through the loop would keep l small tensors per step. This keeps two (b, l, d, n) tensors, exp(ΔA)
    and h, and walks the backward in time chunks of l/8 steps, so the gradient of h is never whole.
    Inputs in the math dtype: u, delta (b, d, l) with bias and softplus applied, A (d, n), B, C (b, g, n, l).
    Returns y (b, d, l) and h_last (b, d, n).
    """

    @staticmethod
    @torch.autocast("cuda", enabled=False)  # the matmuls stay in the math dtype under bf16 autocast
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, u, delta, A, B, C):
        b, d, l = u.shape
        g, n = B.shape[1], B.shape[2]
        ut, dt = u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous()  # (b, l, d)
        Bt, Ct = B.permute(0, 3, 1, 2).contiguous(), C.permute(0, 3, 1, 2).contiguous()  # (b, l, g, n)
        _, h = _scan_states(ut, dt, A, Bt)  # (b, l, d, n)
        y = torch.matmul(h.view(b, l, g, d // g, n), Ct[..., None])  # (b, l, g, d/g, 1)
        ctx.save_for_backward(ut, dt, A, Bt, Ct)
        return y.view(b, l, d).transpose(1, 2), h[:, -1].clone()  # (b, d, l), (b, d, n)

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, dy, dh_last):
        ut, dt, A, Bt, Ct = ctx.saved_tensors
        b, l, d = ut.shape
        g, n = Bt.shape[2], Bt.shape[3]
        H = d // g  # channels per group
        dy = dy.transpose(1, 2).contiguous().view(b, l, g, H, 1)  # (b, l, g, d/g, 1)
        du_in = (dt * ut).view(b, l, g, H, 1)  # (b, l, g, d/g, 1): Δ_t u_t
        dA, h = _scan_states(ut, dt, A, Bt)  # (b, l, d, n) each
        dC = torch.bmm(h.view(-1, H, n).transpose(1, 2), dy.view(-1, H, 1))  # (b*l*g, n, 1): Σ_channels h dy
        dB, d_du, ddelta = torch.empty_like(Bt), torch.empty_like(ut), torch.empty_like(ut)
        dA_param = torch.zeros_like(A)  # (d, n)
        carry = torch.zeros_like(h[:, 0]) if dh_last is None else dh_last  # (b, d, n): dL/dh from later steps
        chunk = -(-l // 8)
        for s in reversed(range(0, l, chunk)):
            e = min(s + chunk, l)
            m = b * (e - s)  # (batch, step) pairs in this chunk
            # dL/dh_t = C_t dy_t + exp(Δ_{t+1} A) dL/dh_{t+1}: the recurrence run backwards
            dh = (dy[:, s:e] * Ct[:, s:e, :, None, :]).view(b, e - s, d, n)  # (b, T, d, n)
            dh[:, -1] += carry
            for t in range(e - s - 2, -1, -1):
                dh[:, t].addcmul_(dA[:, s + t + 1], dh[:, t + 1])
            carry = dA[:, s] * dh[:, 0]
            dhg = dh.view(m * g, H, n)
            dB[:, s:e] = torch.bmm(dhg.transpose(1, 2), du_in[:, s:e].reshape(m * g, H, 1)).view(b, e - s, g, n)
            d_du[:, s:e] = torch.bmm(dhg, Bt[:, s:e].reshape(m * g, n, 1)).view(b, e - s, d)  # dL/d(Δ_t u_t)
            # through exp(Δ_t A): dL/d(Δ_t A) = dL/dh_t * exp(Δ_t A) * h_{t-1}, in dh's memory
            q = dh.mul_(dA[:, s:e])
            q[:, 1:].mul_(h[:, s:e - 1])
            q[:, 0].mul_(h[:, s - 1]) if s > 0 else q[:, 0].zero_()  # h_{-1} = 0
            qd = q.view(m, d, n).transpose(0, 1)  # (d, m, n): the sums below are batched over channels
            ddelta[:, s:e] = torch.bmm(qd, A[:, :, None]).view(d, b, e - s).permute(1, 2, 0)  # Σ_n q A
            dA_param += torch.bmm(qd.transpose(1, 2), dt[:, s:e].reshape(m, d).T[:, :, None]).squeeze(-1)  # Σ q Δ
        ddelta += d_du * ut
        du = d_du * dt  # (b, l, d)
        back = lambda x: x.permute(0, 2, 3, 1)  # (b, l, g, n) -> (b, g, n, l)
        return du.transpose(1, 2), ddelta.transpose(1, 2), dA_param, back(dB), back(dC.view(b, l, g, n))


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """The fast pure-PyTorch scan: same signature and results as selective_scan_ref.

    The l-step loop is one fused in-place multiply-add on (b, d, n) per step, with no autograd graph;
    the contractions with C, B are batched matmuls; everything on (b, d, l) is plain autograd.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    ft = torch.promote_types(u.dtype, torch.float32)
    uf, delta = u.to(ft), delta.to(ft)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ft)[:, None]  # (b, d, l)
    if delta_softplus:
        delta = F.softplus(delta)
    y, h_last = _ScanCore.apply(uf, delta, A.to(ft), _grouped(B).to(ft), _grouped(C).to(ft))
    out = y if D is None else y + D.to(ft)[:, None] * uf  # (b, d, l)
    if z is not None:
        out = out * F.silu(z.to(ft))
    out = out.to(u.dtype)
    return (out, h_last) if return_last_state else out


# -----------------------------------------------------------------------------
# The CUDA selective scan (scan_cuda.cu): build it once on first use, wrap it for autograd

_SCAN_CU = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scan_cuda.cu")
_scan_ext, _scan_why = None, None  # the built module, or why there is none


def _find_cuda_home():
    """a CUDA toolkit folder with bin/nvcc and lib64/libcudart.so, or None"""
    def is_toolkit(p):
        libs = ("lib64", "lib", "targets/x86_64-linux/lib")
        return p and os.path.isfile(os.path.join(p, "bin", "nvcc")) and any(
            os.path.exists(os.path.join(p, lib, "libcudart.so")) for lib in libs)
    found = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        nvcc = os.path.realpath(nvcc)
        found.append(os.path.dirname(os.path.dirname(nvcc)))
        try:  # nvcc on PATH may be a wrapper script that execs the real one: read the path it names
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                found += [m.decode() for m in re.findall(rb"(/[^\s'\"]+)/bin/nvcc", head)]
        except OSError:
            pass
    found += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((p for p in found if is_toolkit(p)), None)


def _cuda_kernel():
    """build (first time, ~30-60 s) and load scan_cuda.cu for this GPU; returns (module, None) or (None, reason)"""
    global _scan_ext, _scan_why
    if _scan_ext is not None or _scan_why is not None:
        return _scan_ext, _scan_why
    try:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")  # set it to build without a GPU (e.g. "9.0")
        if not arch:
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA GPU")
            arch = "%d.%d" % torch.cuda.get_device_capability()
        if not os.environ.get("CUDA_HOME"):
            # torch guesses the toolkit from the nvcc on PATH, which may be a wrapper in /usr/local/bin
            home = _find_cuda_home()
            if home is None:
                raise RuntimeError("no CUDA toolkit (bin/nvcc and lib64/libcudart.so) found; set CUDA_HOME")
            log.info(f"CUDA_HOME is unset; building the CUDA scan with the toolkit in {home}")
            os.environ["CUDA_HOME"] = home
        import torch.utils.cpp_extension as cpp_extension
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]  # torch read CUDA_HOME when it was imported
        old_arch, os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST"), arch
        try:  # one build per GPU architecture, cached in torch's extension folder
            _scan_ext = cpp_extension.load(name="star_scan_sm" + re.sub(r"\W", "", arch.replace("+PTX", "")),
                                           sources=[_SCAN_CU], extra_cuda_cflags=["-O3"], verbose=False)
        finally:
            if old_arch is None:
                del os.environ["TORCH_CUDA_ARCH_LIST"]
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
    except Exception as e:  # any failure: star.py falls back to the PyTorch scan
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        _scan_why = f"{type(e).__name__}: {lines[0][:200]}"
    return _scan_ext, _scan_why


# the kernels as torch.library ops, so that torch.compile sees through _CudaScan (the ops stay opaque)
@torch.library.custom_op("star::scan_fwd", mutates_args=())
def _scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
              delta_softplus: bool, save_all: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, ckpt = _cuda_kernel()[0].fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_all)
    return out, ckpt  # (b, d, l), (b, d, ceil(l / 64) or 1, n) states after each 64-step tile


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_all):
    b, d, l = u.shape
    return torch.empty_like(u), u.new_empty((b, d, -(-l // 64) if save_all else 1, A.shape[1]), dtype=torch.float32)


@torch.library.custom_op("star::scan_bwd", mutates_args=())
def _scan_bwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
              delta_softplus: bool, dout: torch.Tensor, ckpt: torch.Tensor,
              dlast: Optional[torch.Tensor]) -> list[torch.Tensor]:
    # du, ddelta, dA, dB, dC, dD, dz (empty without z), ddelta_bias; dB, dC are (b, g, n, l rounded up to 64)
    return _cuda_kernel()[0].bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout, ckpt, dlast)


@_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout, ckpt, dlast):
    f32 = dict(dtype=torch.float32)
    dB = B.new_empty((*B.shape[:3], ckpt.shape[2] * 64), **f32)
    return [torch.empty_like(u), torch.empty_like(u), torch.empty_like(A), dB, torch.empty_like(dB),
            u.new_empty(u.shape[1], **f32), torch.empty_like(u) if z is not None else u.new_empty(0),
            u.new_empty(u.shape[1], **f32)]


class _CudaScan(torch.autograd.Function):
    """selective_scan_ref's function on the fused kernels; the backward recomputes the states"""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        ctx.B_meta, ctx.C_meta = (B.shape, B.dtype), (C.shape, C.dtype)
        # the kernels take float32 parameters and grouped (b, g, n, l) B and C: all small
        f32 = lambda t: None if t is None else t.float().contiguous()
        A, D, delta_bias = f32(A), f32(D), f32(delta_bias)
        B, C = (f32(t.unsqueeze(1) if t.dim() == 3 else t) for t in (B, C))  # (b, g, n, l)
        u, delta = u.contiguous(), delta.contiguous()  # (b, d, l)
        z = None if z is None else z.contiguous()  # (b, d, l)
        save_all = any(ctx.needs_input_grad[:8])
        out, ckpt = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_all)
        if save_all:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
            ctx.delta_softplus = delta_softplus
        return (out, ckpt[:, :, -1].clone()) if return_last_state else out  # last state: (b, d, n)

    @staticmethod
    def backward(ctx, dout, dlast=None):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        dout = dout.to(u.dtype).contiguous()  # (b, d, l)
        dlast = None if dlast is None else dlast.float().contiguous()  # (b, d, n)
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = _scan_bwd(
            u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, dout, ckpt, dlast)
        l = u.shape[2]
        dB, dC = (g[..., :l].reshape(shape).to(dtype) for g, (shape, dtype) in ((dB, ctx.B_meta), (dC, ctx.C_meta)))
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
                ddelta_bias if delta_bias is not None else None, None, None)


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False):
    """
    selective_scan_ref on the CUDA kernels of scan_cuda.cu (call _cuda_kernel() first).
    u, delta, z: (b, d, l); A: (d, n), n <= 64; B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,)
    returns out (b, d, l) in u's dtype, and last_state (b, d, n) float32 if return_last_state.
    Official implementation: state-spaces/mamba, mamba_ssm/ops/selective_scan_interface.py, selective_scan_fn.
    Unlike the official kernel, the gradient of last_state flows back too.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)  # the same errors as the other scans
    if not 1 <= A.shape[1] <= 64:
        raise ValueError(f"the CUDA scan takes state sizes of 1 to 64, got n = {A.shape[1]}")
    return _CudaScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


_backend_logged = set()


def _scan_backend(u, delta, z):
    """The backend that runs: STAR_SCAN=auto (default) takes the CUDA kernel for GPU inputs where it builds."""
    choice = os.environ.get("STAR_SCAN", "auto")
    if choice not in ("auto", "cuda", "torch", "ref"):
        raise ValueError(f"STAR_SCAN must be one of auto, cuda, torch, ref; got {choice!r}")
    backend, why = choice, "asked for by STAR_SCAN"
    if choice in ("auto", "cuda"):
        if not u.is_cuda:
            kernel, reason = None, "the inputs are on the CPU"
        elif u.dtype not in (torch.float32, torch.bfloat16, torch.float16) or delta.dtype != u.dtype or (
                z is not None and z.dtype != u.dtype):
            kernel, reason = None, "the kernel takes u, delta, z of one dtype: float32, bfloat16 or float16"
        else:
            kernel, reason = _cuda_kernel()
        if kernel is None and choice == "cuda":
            raise RuntimeError(f"STAR_SCAN=cuda, but the CUDA scan cannot run: {reason}")
        if kernel is None and u.is_cuda:
            warnings.warn(f"star: CUDA scan unavailable ({reason}); using the slower PyTorch scan")
        backend, why = ("cuda", "GPU inputs") if kernel is not None else ("torch", reason)
    if backend not in _backend_logged:
        _backend_logged.add(backend)
        log.info(f"selective scan backend: {backend} ({why})")
    return backend


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """The scan the model calls: the CUDA kernel on a GPU, else the PyTorch scan (see _scan_backend)."""
    backend = _scan_backend(u, delta, z)
    fn = {"cuda": selective_scan_cuda, "torch": selective_scan_torch, "ref": selective_scan_ref}[backend]
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

# -----------------------------------------------------------------------------
# The model


@dataclass
class StarConfig:
    img_size: int = 32           # image side in pixels (square images)
    in_chans: int = 3            # 3 for RGB, 1 for grayscale
    patch: int = 4               # patch side in pixels: one token per patch
    cluster: int = 2             # cluster side in patches: c x c patches are predicted together (1 = next patch)
    images_per_seq: int = 4      # K: images packed into one pretraining sequence (STAR uses 4; ARM is 1)
    separator: str = "cluster"   # before every image: "none", "token" (one token) or "cluster" (c*c tokens)
    width: int = 192             # model width; the scan runs on expand * width channels
    depth: int = 12              # MambaMLP blocks
    d_state: int = 16            # n, the state size of every channel
    d_conv: int = 4              # kernel of the causal depthwise conv before the scan
    expand: int = 1              # ARM uses 1 (the MLP carries the width instead)
    mlp_ratio: float = 8 / 3     # SwiGLU hidden width / model width
    dec_width: int = 192         # ARM's decoder: cross-attention only (ARM-B uses 512)
    dec_depth: int = 4
    dec_heads: int = 6
    taps: int = 4                # evenly spaced encoder layers whose features the decoder reads
    num_classes: int = 10
    scan_dirs: int = 4           # classifier scans: 4 = rows and columns both ways (ARM), 2 = Vim's, 1 = causal
    drop_path: float = 0.0       # stochastic depth at the last block (linearly less before it)

    def __post_init__(self):
        if self.img_size % self.patch:
            raise ValueError(f"img_size must be divisible by patch: got img_size={self.img_size}, "
                             f"patch={self.patch}")
        if (self.img_size // self.patch) % self.cluster:
            raise ValueError(f"the patch grid ({self.img_size // self.patch} per side) must be divisible by "
                             f"cluster, got cluster={self.cluster}")
        if self.separator not in ("none", "token", "cluster"):
            raise ValueError(f"separator must be 'none', 'token' or 'cluster', got {self.separator!r}")
        if self.scan_dirs not in (1, 2, 4):
            raise ValueError(f"scan_dirs must be 1, 2 or 4, got {self.scan_dirs}")
        if not 1 <= self.taps <= self.depth or self.dec_width % self.dec_heads:
            raise ValueError(f"need 1 <= taps <= depth and dec_width divisible by dec_heads, got taps={self.taps}"
                             f", depth={self.depth}, dec_width={self.dec_width}, dec_heads={self.dec_heads}")

    grid = property(lambda self: self.img_size // self.patch)                   # patches per side
    num_patches = property(lambda self: self.grid ** 2)                          # N tokens per image
    patch_dim = property(lambda self: self.patch ** 2 * self.in_chans)           # pixels per patch
    sep_len = property(lambda self: {"none": 0, "token": 1, "cluster": self.cluster ** 2}[self.separator])
    seq_len = property(lambda self: self.images_per_seq * (self.sep_len + self.num_patches))


class ScanBranch(nn.Module):
    """One scan direction of a Mamba mixer: causal conv, input-dependent Δ, B, C, and the SSM parameters A, D.

    Official implementation: state-spaces/mamba, mamba_ssm/modules/mamba_simple.py (Mamba.__init__, forward, step).
    """

    def __init__(self, d_inner, d_state, d_conv, dt_rank, dt_min=1e-3, dt_max=0.1):
        super().__init__()
        self.dt_rank, self.d_state = dt_rank, d_state
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        # Mamba's Δ initialisation: softplus(bias) log-uniform in [dt_min, dt_max]
        nn.init.uniform_(self.dt_proj.weight, -dt_rank ** -0.5, dt_rank ** -0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        # S4D-real initialisation: A = -(1, 2, ..., n) for every channel
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1).float()).repeat(d_inner, 1))  # (d, n)
        self.D = nn.Parameter(torch.ones(d_inner))  # (d,)

    def forward(self, x):
        """x (b, l, d) -> y (b, l, d), before the gate."""
        l = x.shape[1]
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :l])  # (b, d, l): right padding cut, so causal
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.T).transpose(1, 2)  # (b, d, l); the bias goes in as delta_bias
        y = selective_scan(x, delta, -torch.exp(self.A_log.float()), B.transpose(1, 2), C.transpose(1, 2),
                           self.D.float(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        return y.transpose(1, 2)  # (b, l, d)

    def step(self, x, conv_state, ssm_state):
        """One token: x (b, d); conv_state (b, d, d_conv), ssm_state (b, d, n), both updated in place."""
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = x
        x = F.silu((conv_state * self.conv1d.weight.squeeze(1)).sum(-1) + self.conv1d.bias)  # (b, d)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))  # (b, d)
        dA = torch.exp(delta[..., None] * -torch.exp(self.A_log.float()))  # (b, d, n)
        ssm_state.copy_(dA * ssm_state + (delta * x)[..., None] * B[:, None, :])
        return (ssm_state * C[:, None, :]).sum(-1) + self.D * x  # (b, d)


class MambaMixer(nn.Module):
    """Mamba: in_proj to (x, z), one ScanBranch per scan direction, gate with silu(z), out_proj.

    With several directions (finetuning) every branch reads the tokens in its own order and their outputs are
    averaged before the gate, as ARM does; in_proj and out_proj are shared.
    """

    def __init__(self, cfg, dirs=1):
        super().__init__()
        d_inner = cfg.expand * cfg.width
        self.in_proj = nn.Linear(cfg.width, 2 * d_inner, bias=False)
        dt_rank = math.ceil(cfg.width / 16)
        self.branches = nn.ModuleList(ScanBranch(d_inner, cfg.d_state, cfg.d_conv, dt_rank) for _ in range(dirs))
        self.out_proj = nn.Linear(d_inner, cfg.width, bias=False)

    def forward(self, x, orders=None):
        """x (b, l, width); orders: one (perm, inverse) pair of (l,) indices per branch, None for as-is."""
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (b, l, d) each
        ys = []
        for branch, order in zip(self.branches, orders or [None]):
            ys.append(branch(x) if order is None else branch(x[:, order[0]])[:, order[1]])
        return self.out_proj(torch.stack(ys).mean(0) * F.silu(z))  # (b, l, width)

    def step(self, x, state):
        """One token x (b, width) with the causal branch; state = (conv_state, ssm_state) from init_state."""
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (b, d) each
        return self.out_proj(self.branches[0].step(x, *state) * F.silu(z))  # (b, width)

    def init_state(self, b):
        w = self.branches[0].conv1d.weight
        d, d_conv, n = w.shape[0], w.shape[-1], self.branches[0].d_state
        return w.new_zeros(b, d, d_conv), w.new_zeros(b, d, n, dtype=torch.float32)


class SwiGLU(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        a, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * a)


class MambaMLPBlock(nn.Module):
    """ARM's block: x = x + Mamba(LN(x)); x = x + SwiGLU(LN(x))."""

    def __init__(self, cfg, dirs=1, drop_path=0.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.mixer = MambaMixer(cfg, dirs)
        self.mlp = SwiGLU(cfg.width, int(cfg.mlp_ratio * cfg.width))
        self.drop_path = drop_path

    def _drop(self, x):
        # stochastic depth: drop the whole residual branch for some samples, rescale the others
        if not self.training or self.drop_path == 0.0:
            return x
        keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - self.drop_path)
        return x * keep / (1 - self.drop_path)

    def forward(self, x, orders=None):
        x = x + self._drop(self.mixer(self.norm1(x), orders))
        return x + self._drop(self.mlp(self.norm2(x)))


def sincos_2d(grid, width):
    """Fixed 2D sin-cos position embedding (MAE's): (grid*grid, width), raster order of patches."""
    if width % 4:
        raise ValueError(f"width must be divisible by 4 for the 2D sin-cos embedding, got {width}")
    freq = 1.0 / 10000 ** (torch.arange(width // 4) / (width // 4))  # (width/4,)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ang_y, ang_x = ys.flatten()[:, None] * freq, xs.flatten()[:, None] * freq  # (N, width/4) each
    return torch.cat([ang_x.sin(), ang_x.cos(), ang_y.sin(), ang_y.cos()], dim=1)  # (N, width)


def patchify(imgs, p):
    """(b, C, H, W) -> (b, N, p*p*C): patches in raster order, each patch's pixels as (py, px, channel)."""
    b, c, hh, ww = imgs.shape
    x = imgs.reshape(b, c, hh // p, p, ww // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (hh // p) * (ww // p), p * p * c)


def unpatchify(patches, p, c):
    """(b, N, p*p*C) -> (b, C, H, W), the inverse of patchify for square images."""
    b, num, _ = patches.shape
    g = math.isqrt(num)
    x = patches.reshape(b, g, g, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)


def cluster_order(grid, c):
    """(N,) raster patch index of every sequence position: clusters in raster order, patches inside in raster order."""
    idx = torch.arange(grid * grid).view(grid // c, c, grid // c, c)  # (cluster row, row in it, cluster col, col)
    return idx.permute(0, 2, 1, 3).flatten()


def scan_orders(grid, dirs):
    """The classifier's token orders as (perm, inverse) pairs: rows forward/backward, columns forward/backward."""
    raster = torch.arange(grid * grid)
    columns = raster.view(grid, grid).T.flatten()
    perms = [raster, raster.flip(0), columns, columns.flip(0)][:dirs]
    return [(p, torch.argsort(p)) for p in perms]


class VisionMamba(nn.Module):
    """Patch embedding, then MambaMLP blocks; returns the output of every block that taps_at names."""

    def __init__(self, cfg, dirs=1):
        super().__init__()
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.width)  # a conv with stride = patch, on patchified pixels
        self.register_buffer("pos", sincos_2d(cfg.grid, cfg.width), persistent=False)  # (N, width)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(MambaMLPBlock(cfg, dirs, r) for r in rates)

    def embed(self, patches):
        """(b, N, p*p*C) raster order -> (b, N, width), with the same positions in every image."""
        return self.patch_embed(patches) + self.pos

    def forward(self, x, taps_at=(), orders=None):
        """x (b, l, width) -> list of (b, l, width), one per index in taps_at (the last block when empty)."""
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x, orders)
            if i in taps_at:
                feats.append(x)
        return feats or [x]

# -----------------------------------------------------------------------------
# STAR: separator packing and the next-cluster objective


def pack_with_separators(tokens, separator, K):
    """K images per sequence, the same separator before every image.

    tokens (b, N, width): each image's tokens in sequence order; separator (s, width), s may be 0.
    Returns (b/K, K*(s+N), width): [sep, image 0, sep, image 1, ...].
    """
    b, num, width = tokens.shape
    if b % K:
        raise ValueError(f"the batch ({b} images) must be divisible by images_per_seq K={K}")
    x = tokens.view(b // K, K, num, width)
    sep = separator.expand(b // K, K, *separator.shape)  # (b/K, K, s, width): one shared separator
    return torch.cat([sep, x], dim=2).flatten(1, 2)  # (b/K, K*(s+N), width)


def unpack_images(seq, K, s):
    """The inverse of pack_with_separators: (b/K, K*(s+N), width) -> (b, N, width), separators dropped."""
    bk, length, width = seq.shape
    return seq.view(bk, K, length // K, width)[:, :, s:].flatten(0, 1)


def next_cluster_targets(cfg):
    """Which patches are targets and what each may see.

    Returns target (Q,) indices into the K*N image patches of a sequence (in sequence order), and
    visible (Q, L) bool: the target patch in cluster j of image k sees every sequence position before the first
    token of that cluster (the separator and all earlier images included), nothing after. Separators are never
    targets; the first cluster of the first image is no target when there is no separator to predict it from.
    """
    K, s, num, cc = cfg.images_per_seq, cfg.sep_len, cfg.num_patches, cfg.cluster ** 2
    k, i = torch.arange(K).repeat_interleave(num), torch.arange(num).repeat(K)  # (K*N,) image, position in image
    cluster_start = k * (s + num) + s + (i // cc) * cc  # (K*N,) sequence position of the cluster's first token
    visible = torch.arange(cfg.seq_len)[None, :] < cluster_start[:, None]  # (K*N, L)
    target = visible.any(1).nonzero().squeeze(1)  # (Q,)
    return target, visible[target]


def next_cluster_loss(pred, patches, eps=1e-6):
    """MSE between predictions and per-patch normalised pixels (each patch minus its mean, over its std).

    pred, patches (..., p*p*C).
    """
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    return F.mse_loss(pred.float(), ((patches - mean) / (var + eps).sqrt()).float())


class CrossBlock(nn.Module):
    """ARM's decoder layer: the queries attend to the encoder features (no self-attention), then an MLP."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.kv, self.proj = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, mem, visible):
        """x (b, Q, e) queries; mem (b, L, e) encoder features; visible (Q, L) bool."""
        b, nq, e = x.shape
        heads = lambda t: t.view(b, -1, self.heads, e // self.heads).transpose(1, 2)  # (b, heads, ., e/heads)
        q = heads(self.q(self.norm_q(x)))
        k, v = map(heads, self.kv(self.norm_kv(mem)).chunk(2, dim=-1))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)  # (b, heads, Q, e/heads)
        x = x + self.proj(att.transpose(1, 2).reshape(b, nq, e))
        return x + self.mlp(self.norm2(x))


def _init_linear(module):
    """ARM's (timm's) init: truncated normal 0.02 for linear weights, zero biases; Mamba's Δ projection kept."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and not name.endswith("dt_proj"):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _check_images(imgs, cfg, model):
    want = (cfg.in_chans, cfg.img_size, cfg.img_size)
    if imgs.dim() != 4 or tuple(imgs.shape[1:]) != want:
        raise ValueError(f"expected images (b, {want[0]}, {want[1]}, {want[2]}) for this config, "
                         f"got {tuple(imgs.shape)}")
    device = next(model.parameters()).device
    if imgs.device != device:
        raise ValueError(f"images are on {imgs.device} but the model is on {device}")


class StarPretrain(nn.Module):
    """The causal Vision Mamba with ARM's decoder, trained to predict the next cluster of every packed image."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionMamba(cfg, dirs=1)
        self.separator = nn.Parameter(torch.zeros(cfg.sep_len, cfg.width))  # (s, width), the same before every image
        nn.init.trunc_normal_(self.separator, std=0.02)
        self.taps_at = [(i + 1) * cfg.depth // cfg.taps - 1 for i in range(cfg.taps)]  # evenly spaced, last included
        self.tap_norms = nn.ModuleList(nn.LayerNorm(cfg.width) for _ in self.taps_at)
        self.tap_proj = nn.Linear(cfg.taps * cfg.width, cfg.dec_width)
        self.query = nn.Parameter(torch.zeros(1, 1, cfg.dec_width))  # one shared query, plus the target's position
        nn.init.trunc_normal_(self.query, std=0.02)
        self.dec_blocks = nn.ModuleList(CrossBlock(cfg.dec_width, cfg.dec_heads) for _ in range(cfg.dec_depth))
        self.dec_norm = nn.LayerNorm(cfg.dec_width)
        self.dec_head = nn.Linear(cfg.dec_width, cfg.patch_dim)
        order = cluster_order(cfg.grid, cfg.cluster)  # (N,) raster index at every position of an image
        target, visible = next_cluster_targets(cfg)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("target", target, persistent=False)  # (Q,)
        self.register_buffer("visible", visible, persistent=False)  # (Q, L)
        dec_pos = sincos_2d(cfg.grid, cfg.dec_width)[order].repeat(cfg.images_per_seq, 1)[target]  # (Q, dec_width)
        self.register_buffer("dec_pos", dec_pos, persistent=False)
        _init_linear(self)

    def predict(self, imgs):
        """Teacher-forced next-cluster predictions. imgs (b, C, H, W), b divisible by K.

        Returns pred and patches, both (b/K, Q, p*p*C): the prediction and the true pixels of every target patch.
        """
        cfg = self.cfg
        _check_images(imgs, cfg, self)
        K = cfg.images_per_seq
        patches = patchify(imgs, cfg.patch)[:, self.order]  # (b, N, p*p*C) in sequence order
        tokens = self.encoder.embed(patchify(imgs, cfg.patch))[:, self.order]  # (b, N, width)
        seq = pack_with_separators(tokens, self.separator, K)  # (b/K, L, width)
        feats = self.encoder(seq, taps_at=self.taps_at)  # taps x (b/K, L, width)
        mem = self.tap_proj(torch.cat([norm(f) for norm, f in zip(self.tap_norms, feats)], dim=-1))  # (b/K, L, e)
        x = (self.query + self.dec_pos).expand(mem.shape[0], -1, -1)  # (b/K, Q, e)
        for block in self.dec_blocks:
            x = block(x, mem, self.visible)
        pred = self.dec_head(self.dec_norm(x))  # (b/K, Q, p*p*C)
        return pred, patches.reshape(mem.shape[0], -1, cfg.patch_dim)[:, self.target]

    def forward(self, imgs):
        """The STAR loss of a batch of images (b, C, H, W)."""
        return next_cluster_loss(*self.predict(imgs))

    def predicted_images(self, imgs):
        """The teacher-forced predictions as images (b, C, H, W), each patch shown with its true mean and std.

        The first cluster of the first image is kept as it is when it is no target.
        """
        cfg = self.cfg
        pred, true = self.predict(imgs)  # (b/K, Q, p*p*C) each
        mean, std = true.mean(-1, keepdim=True), (true.var(-1, keepdim=True) + 1e-6).sqrt()
        patches = patchify(imgs, cfg.patch)[:, self.order].reshape(pred.shape[0], -1, cfg.patch_dim).clone()
        patches[:, self.target] = (pred * std + mean).to(patches.dtype)
        patches = patches.view(imgs.shape[0], cfg.num_patches, cfg.patch_dim)[:, torch.argsort(self.order)]
        return unpatchify(patches, cfg.patch, cfg.in_chans)


class StarClassifier(nn.Module):
    """Finetuning: the encoder on single images with bidirectional scans, mean pooling, a linear head.

    ARM also puts a cls token in the middle of the sequence; we pool the patch tokens only, since the four scan
    directions already let every token see the whole image, and there is no token for load_pretrained to miss.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionMamba(cfg, dirs=cfg.scan_dirs)
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.num_classes)
        for i, (perm, inv) in enumerate(scan_orders(cfg.grid, cfg.scan_dirs)):
            self.register_buffer(f"perm{i}", perm, persistent=False)
            self.register_buffer(f"inv{i}", inv, persistent=False)
        _init_linear(self)

    def features(self, imgs):
        """(b, C, H, W) -> (b, width): mean of the patch tokens."""
        _check_images(imgs, self.cfg, self)
        orders = [(getattr(self, f"perm{i}"), getattr(self, f"inv{i}")) for i in range(self.cfg.scan_dirs)]
        x = self.encoder(self.encoder.embed(patchify(imgs, self.cfg.patch)), orders=orders)[-1]  # (b, N, width)
        return self.norm(x.mean(1))

    def forward(self, imgs):
        return self.head(self.features(imgs))  # (b, num_classes)

    def load_pretrained(self, state_dict):
        """Load a StarPretrain state dict: every scan direction starts from the pretrained causal one.

        Returns (missing, unexpected) key lists, as load_state_dict does.
        """
        mapped = {}
        for key, value in state_dict.items():
            if ".branches.0." in key:
                for i in range(self.cfg.scan_dirs):
                    mapped[key.replace(".branches.0.", f".branches.{i}.")] = value
            else:
                mapped[key] = value
        result = self.load_state_dict(mapped, strict=False)
        return result.missing_keys, result.unexpected_keys


# -----------------------------------------------------------------------------
# Presets. Parameters of the classifier (four-way scans) / of the pretraining model (with the decoder):
#   tiny   35,582 / 52,308        tests in seconds on a CPU; 16 tokens an image, K=2
#   demo   202,394 / 272,976      the CPU demo, K=2; one causal scan to classify, and next-patch
#                                 targets (cluster 1), so pretraining reads the tokens in that order
#   cifar  5,629,642 / 7,022,064  32 px, patch 4, clusters of 2x2, K=4: 4 x (4 + 64) = 272 tokens
#   base   84,879,592 / 94,535,168  STAR-B: 192 px, patch 16, clusters of 4x4, K=4: 4 x (16 + 144) = 640 tokens;
#          ARM-B has about 85M as a finetuned classifier (finetuning at 224 px changes no parameter count)

PRESETS = {
    "tiny": StarConfig(img_size=32, patch=8, cluster=2, width=32, depth=2, d_state=4, dec_width=32,
                       dec_depth=1, dec_heads=2, taps=2, images_per_seq=2),
    "demo": StarConfig(img_size=32, patch=8, cluster=1, width=64, depth=4, d_state=4, dec_width=64,
                       dec_depth=1, dec_heads=2, taps=2, images_per_seq=2, scan_dirs=1),
    "cifar": StarConfig(),
    "base": StarConfig(img_size=192, patch=16, cluster=4, width=768, depth=12, dec_width=512, dec_heads=16,
                       num_classes=1000),
}


def make_config(preset, **overrides):
    """A preset with some fields replaced, e.g. make_config("cifar", images_per_seq=1, separator="none")."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **overrides)


def count_params(model):
    return sum(p.numel() for p in model.parameters())
