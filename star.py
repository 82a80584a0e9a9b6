"""
STAR in one file: separators for autoregressive pretraining of a Vision Mamba.

Reading list
  - Liu et al., "Separators in Enhancing Autoregressive Pretraining for Vision Mamba" (STAR),
    arXiv 2603.03806, 2026
  - Ren et al., "Autoregressive Pretraining with Mamba in Vision" (ARM), ICLR 2025
  - Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023
  - Zhu et al., "Vision Mamba" (Vim), ICML 2024

Glossary (code name -> paper symbol)
  b          batch (images, or packed sequences)
  l          sequence length (tokens)
  d          channels of the scan (d_inner)
  n          state size per channel (d_state)
  g          groups of B and C (one per scan direction)
  delta      Δ, the input-dependent step size
  A          (d, n) state matrix, diagonal, negative
  B, C       input and output projections of the state (in image shapes (b, C, H, W), C channels)
  D          skip connection u -> y
  z          gate: y * silu(z)
  u          scan input (after the causal conv)
  h          state, (b, d, n) at every step
  patch      p x p pixels, one token; N patches in an image
  cluster    c x c neighbouring patches, predicted together
  separator  one learned vector, repeated s times (0, 1 or c*c) before every image
  K          images packed into one sequence of L = K * (s + N) tokens; k one image's index
  Q          targets of one sequence: the image patches predicted; e the decoder width (dec_width)
  dirs       scan directions: 1 to pretrain (causal), cfg.scan_dirs to finetune (cifar 4, demo 1)

The file reads bottom-up: the selective scan (reference, fast PyTorch fallback, CUDA loader), the
config StarConfig, the Mamba mixer, the MambaMLP block, the Vision Mamba encoder, separator packing,
the next-cluster objective, the pretraining model, the finetuning classifier, and the presets.
"""
import glob
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("star")

# -----------------------------------------------------------------------------
# Selective scan: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,
#                 y_t = C_t h_t + D u_t,  out = y * silu(z)


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
        plain = t.shape == (b, n, l)
        grouped = t.dim() == 4 and t.shape[0] == b and t.shape[2:] == (n, l) and d % t.shape[1] == 0
        if not (plain or grouped):
            raise ValueError(f"{name} must be (b, n, l) = ({b}, {n}, {l}) or (b, g, n, l) with "
                             f"d={d} divisible by g, got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (d,):
            raise ValueError(f"{name} must be (d,) = ({d},), got {tuple(t.shape)}")
    devices = {t.device for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all scan inputs must be on one device, got {sorted(map(str, devices))}")


def _grouped(M):
    """B or C as (b, g, n, l): the plain (b, n, l) form is one group."""
    return M.unsqueeze(1) if M.dim() == 3 else M


def _scan_in_pytorch(core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """Both PyTorch scans: Δ's bias and softplus, then core for y_t = C_t h_t, then D and the gate.

    core(u, delta, A, B, C) returns y (b, d, l) and the last state h (b, d, n). Math in float32
    (float64 for float64 inputs, so gradcheck can use it); output in u's dtype.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    ft = torch.promote_types(u.dtype, torch.float32)  # the math dtype
    uf = u.to(ft)  # (b, d, l)
    delta = delta.to(ft)  # (b, d, l)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ft)[:, None]  # (b, d, l)
    if delta_softplus:
        delta = F.softplus(delta)
    B = _grouped(B).to(ft)  # (b, g, n, l)
    C = _grouped(C).to(ft)  # (b, g, n, l)
    y, h_last = core(uf, delta, A.to(ft), B, C)  # (b, d, l), (b, d, n)
    if D is not None:
        y = y + D.to(ft)[:, None] * uf
    if z is not None:
        y = y * F.silu(z.to(ft))
    y = y.to(u.dtype)
    return (y, h_last) if return_last_state else y


def _ref_core(u, delta, A, B, C):
    """The recurrence one step at a time; autograd does the backward."""
    b, d, l = u.shape
    B = B.repeat_interleave(d // B.shape[1], dim=1)  # (b, d, n, l): channel i, group i // (d/g)
    C = C.repeat_interleave(d // C.shape[1], dim=1)  # (b, d, n, l)
    h = u.new_zeros(b, d, A.shape[1])  # (b, d, n)
    ys = []
    for t in range(l):
        dA = torch.exp(delta[:, :, t, None] * A)  # (b, d, n)
        h = dA * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[..., t]  # (b, d, n)
        ys.append((h * C[..., t]).sum(-1))  # (b, d)
    return torch.stack(ys, dim=2), h  # (b, d, l), (b, d, n)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The oracle: the recurrence one step at a time, with autograd doing the backward.

    Same semantics and shapes as the official selective_scan_ref (state-spaces/mamba,
    mamba_ssm/ops/selective_scan_interface.py): u, delta, z (b, d, l); A (d, n); B, C (b, n, l) or
    grouped (b, g, n, l), channel i reading group i // (d // g); D, delta_bias (d,). Output in u's
    dtype; the last state (b, d, n) in the math dtype. Real weights only.
    """
    return _scan_in_pytorch(_ref_core, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                            return_last_state)


def _scan_states(u, delta, A, B):
    """All states h_t of the recurrence, in place, one fused multiply-add per step.

    u, delta (b, l, d); A (d, n); B (b, l, g, n). Returns exp(ΔA) and h, both (b, l, d, n).
    """
    b, l, d = u.shape
    dA = (delta[..., None] * A).exp_()  # (b, l, d, n)
    h = (delta * u).view(*B.shape[:3], -1, 1) * B[:, :, :, None]  # (b, l, g, d/g, n): Δ_t B_t u_t
    h = h.view(b, l, d, -1)  # (b, l, d, n)
    for t in range(1, l):
        h[:, t].addcmul_(dA[:, t], h[:, t - 1])  # h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t
    return dA, h


class _ScanCore(torch.autograd.Function):
    """y_t = C_t h_t and the last state, with a hand-written backward that recomputes the states.

    Autograd through the loop would keep a few (b, d, n) tensors per step. The forward builds
    exp(ΔA) and h, both (b, l, d, n), but saves only its inputs, time-major: u, delta (b, d, l)
    with Δ's bias and softplus applied, A (d, n), B, C (b, g, n, l), in the math dtype. The
    backward rebuilds both, walking back in chunks of ceil(l/8) steps: dL/dh is never whole.
    """

    @staticmethod
    @torch.autocast("cuda", enabled=False)  # the matmuls stay in the math dtype under autocast
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, u, delta, A, B, C):
        b, d, l = u.shape
        _, g, n, _ = B.shape
        ut = u.transpose(1, 2).contiguous()  # (b, l, d)
        dt = delta.transpose(1, 2).contiguous()  # (b, l, d)
        Bt = B.permute(0, 3, 1, 2).contiguous()  # (b, l, g, n)
        Ct = C.permute(0, 3, 1, 2).contiguous()  # (b, l, g, n)
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
        _, _, g, n = Bt.shape
        dg = d // g  # channels per group
        dy = dy.transpose(1, 2).contiguous().view(b, l, g, dg, 1)  # (b, l, g, d/g, 1)
        du_in = (dt * ut).view(b, l, g, dg, 1)  # (b, l, g, d/g, 1): Δ_t u_t
        dA, h = _scan_states(ut, dt, A, Bt)  # (b, l, d, n) each
        # dL/dC_t = Σ_channels h_t dy_t
        dC = torch.bmm(h.view(-1, dg, n).transpose(1, 2), dy.view(-1, dg, 1))  # (b*l*g, n, 1)
        dB = torch.empty_like(Bt)  # (b, l, g, n)
        d_du = torch.empty_like(ut)  # (b, l, d): dL/d(Δ_t u_t)
        ddelta = torch.empty_like(ut)  # (b, l, d)
        dA_param = torch.zeros_like(A)  # (d, n)
        carry = dh_last  # (b, d, n): from later steps; autograd passes zeros when it is unused
        chunk = -(-l // 8)  # steps per chunk: ceil(l/8)
        for t0 in reversed(range(0, l, chunk)):
            t1 = min(t0 + chunk, l)  # this chunk: steps t0 to t1 - 1
            m = b * (t1 - t0)  # (batch, step) pairs in this chunk
            # dL/dh_t = C_t dy_t + exp(Δ_{t+1} A) dL/dh_{t+1}: the recurrence run backwards
            dh = (dy[:, t0:t1] * Ct[:, t0:t1, :, None, :]).view(b, -1, d, n)  # (b, t1-t0, d, n)
            dh[:, -1] += carry
            for t in range(t1 - t0 - 2, -1, -1):
                dh[:, t].addcmul_(dA[:, t0 + t + 1], dh[:, t + 1])
            carry = dA[:, t0] * dh[:, 0]
            dhg = dh.view(m * g, dg, n)
            dB_chunk = torch.bmm(dhg.transpose(1, 2), du_in[:, t0:t1].reshape(m * g, dg, 1))
            dB[:, t0:t1] = dB_chunk.view(b, t1 - t0, g, n)
            d_du[:, t0:t1] = torch.bmm(dhg, Bt[:, t0:t1].reshape(m * g, n, 1)).view(b, -1, d)
            # through exp(Δ_t A): dL/d(Δ_t A) = dL/dh_t * exp(Δ_t A) * h_{t-1}, in dh's memory
            q = dh.mul_(dA[:, t0:t1])  # (b, t1-t0, d, n)
            q[:, 1:].mul_(h[:, t0:t1 - 1])
            if t0 > 0:
                q[:, 0].mul_(h[:, t0 - 1])
            else:
                q[:, 0].zero_()  # h_{-1} = 0
            qd = q.view(m, d, n).transpose(0, 1)  # (d, m, n): the sums below batch over channels
            ddelta_chunk = torch.bmm(qd, A[:, :, None]).view(d, b, t1 - t0)  # Σ_n q A
            ddelta[:, t0:t1] = ddelta_chunk.permute(1, 2, 0)
            dt_chunk = dt[:, t0:t1].reshape(m, d).T[:, :, None]  # (d, m, 1)
            dA_param += torch.bmm(qd.transpose(1, 2), dt_chunk).squeeze(-1)  # Σ q Δ
        ddelta += d_du * ut
        du = d_du * dt  # (b, l, d)
        dB = dB.permute(0, 2, 3, 1)  # (b, g, n, l)
        dC = dC.view(b, l, g, n).permute(0, 2, 3, 1)  # (b, g, n, l)
        return du.transpose(1, 2), ddelta.transpose(1, 2), dA_param, dB, dC


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """The fast pure-PyTorch scan: same signature and results as selective_scan_ref.

    The l-step loop is one fused in-place multiply-add on (b, d, n) per step, with no autograd
    graph; the contractions with C, B are batched matmuls; all on (b, d, l) is plain autograd.
    """
    return _scan_in_pytorch(_ScanCore.apply, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                            return_last_state)


# -----------------------------------------------------------------------------
# The CUDA selective scan (scan_cuda.cu): built once on first use, wrapped for autograd

_SCAN_CU = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scan_cuda.cu")
_scan_ext = None  # the built extension
_scan_why = None  # or why there is none


def _find_cuda_home():
    """A CUDA toolkit folder holding bin/nvcc and libcudart.so, or None. The nvcc on PATH may be a
    wrapper script that execs the real one (some machines have one in /usr/local/bin), so the
    folders such a script names are tried too."""
    homes = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        nvcc = os.path.realpath(nvcc)
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
        except OSError:  # unreadable: only its own folder is tried
            head = b""
        named = re.findall(rb"(/[^\s'\"]+)/bin/nvcc", head) if head.startswith(b"#!") else []
        homes = [os.path.dirname(os.path.dirname(nvcc))] + [m.decode() for m in named] + homes
    for home in homes:
        # lib64, lib; conda's toolkits keep libcudart under targets/
        folders = ("lib64", "lib", "targets/x86_64-linux/lib")
        libs = [os.path.join(home, lib, "libcudart.so") for lib in folders]
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and any(map(os.path.exists, libs)):
            return home
    return None


def _build_kernel():
    """Compile scan_cuda.cu for this GPU (or TORCH_CUDA_ARCH_LIST); torch caches the build."""
    given = os.environ.get("TORCH_CUDA_ARCH_LIST")  # set it to build without a GPU, e.g. "9.0"
    if not given and not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU")
    arch = given or "%d.%d" % torch.cuda.get_device_capability()
    if not os.environ.get("CUDA_HOME"):
        home = _find_cuda_home()
        if home is None:
            raise RuntimeError("no CUDA toolkit (bin/nvcc and libcudart.so) found; set CUDA_HOME")
        log.info(f"CUDA_HOME is unset; building the CUDA scan with the toolkit in {home}")
        os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]  # torch read CUDA_HOME when it was imported
    name = "star_scan_sm" + re.sub(r"\W", "", arch.replace("+PTX", ""))  # one build per arch
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch  # what cpp_extension builds for
    try:
        return cpp_extension.load(name=name, sources=[_SCAN_CU], extra_cuda_cflags=["-O3"])
    finally:
        if given is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]


def _cuda_kernel():
    """(the built scan_cuda.cu, None), or (None, why it cannot be built); built once per process."""
    global _scan_ext, _scan_why
    if _scan_ext is None and _scan_why is None:
        try:
            _scan_ext = _build_kernel()
        except Exception as err:  # any failure: star.py falls back to the PyTorch scan
            first = next((line for line in str(err).splitlines() if line.strip()), "")
            _scan_why = f"{type(err).__name__}: {first[:200]}"
    return _scan_ext, _scan_why


# The kernels as torch.library ops, which torch.compile keeps opaque. Eager calls skip them and
# call the extension directly: an op call adds several microseconds of Python dispatch.
@torch.library.custom_op("star::scan_fwd", mutates_args=())
def _scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
              delta_bias: Optional[torch.Tensor], delta_softplus: bool,
              save_all: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, ckpt = _cuda_kernel()[0].fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_all)
    return out, ckpt


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_all):
    tiles = -(-u.shape[2] // 64) if save_all else 1  # (b, d, tiles, n)
    return torch.empty_like(u), u.new_empty((*u.shape[:2], tiles, A.shape[1]), dtype=torch.float32)


@torch.library.custom_op("star::scan_bwd", mutates_args=())
def _scan_bwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
              delta_bias: Optional[torch.Tensor], delta_softplus: bool, dout: torch.Tensor,
              ckpt: torch.Tensor, dlast: Optional[torch.Tensor]) -> list[torch.Tensor]:
    ext = _cuda_kernel()[0]
    return ext.bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout, ckpt, dlast)


@_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout, ckpt, dlast):
    dB = B.new_empty((*B.shape[:3], ckpt.shape[2] * 64), dtype=torch.float32)
    d_param = u.new_empty(u.shape[1], dtype=torch.float32)  # dD, ddelta_bias: (d,)
    dz = torch.empty_like(u) if z is not None else u.new_empty(0)
    return [torch.empty_like(u), torch.empty_like(u), torch.empty_like(A), dB, torch.empty_like(dB),
            d_param, dz, torch.empty_like(d_param)]


def _f32(t):
    """A small parameter (A, B, C, D, Δ bias) as the kernels read it: contiguous float32."""
    return None if t is None else t.float().contiguous()


class _CudaScan(torch.autograd.Function):
    """selective_scan_ref's function on the fused kernels; the backward recomputes the states.
    The kernels read u, delta, z contiguous in their dtype, the rest contiguous float32."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        ext = _scan_fwd if torch.compiler.is_compiling() else _cuda_kernel()[0].fwd
        ctx.B_C_like = (B.shape, B.dtype, C.shape, C.dtype)
        ctx.delta_softplus = delta_softplus
        z = None if z is None else z.contiguous()  # (b, d, l)
        args = (u.contiguous(), delta.contiguous(), _f32(A), _f32(_grouped(B)), _f32(_grouped(C)),
                _f32(D), z, _f32(delta_bias))
        save_all = any(ctx.needs_input_grad[:8])  # keep the tile states only for a backward
        out, ckpt = ext(*args, delta_softplus, save_all)
        if save_all:
            ctx.save_for_backward(*args, ckpt)
        if return_last_state:
            return out, ckpt[:, :, -1].clone()  # last state: (b, d, n)
        return out

    @staticmethod
    def backward(ctx, dout, dlast=None):
        ext = _scan_bwd if torch.compiler.is_compiling() else _cuda_kernel()[0].bwd
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        B_shape, B_dtype, C_shape, C_dtype = ctx.B_C_like
        dout = dout.to(u.dtype).contiguous()  # (b, d, l)
        dlast = None if dlast is None else dlast.float().contiguous()  # (b, d, n)
        grads = ext(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, dout, ckpt, dlast)
        du, ddelta, dA, dB, dC = grads[:5]
        l = u.shape[2]
        dB = dB[..., :l].reshape(B_shape).to(B_dtype)  # B's own shape and dtype
        dC = dC[..., :l].reshape(C_shape).to(C_dtype)
        # dD, dz, ddelta_bias only for the inputs that were given
        optional = [g if t is not None else None for g, t in zip(grads[5:], (D, z, delta_bias))]
        return du, ddelta, dA, dB, dC, *optional, None, None


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False):
    """selective_scan_ref on the CUDA kernels of scan_cuda.cu (built on first use).

    selective_scan_ref's shapes with n <= 64; the last state (b, d, n) comes in float32. Official
    implementation: state-spaces/mamba, mamba_ssm/ops/selective_scan_interface.py,
    selective_scan_fn. Unlike the official kernel, the gradient of the last state flows back too.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)  # the same errors as the other scans
    if not 1 <= A.shape[1] <= 64:
        raise ValueError(f"the CUDA scan takes state sizes of 1 to 64, got n = {A.shape[1]}")
    return _CudaScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _scan_backend(u, delta, A, z):
    """Which scan runs, and why. STAR_SCAN=auto (the default) takes the CUDA kernel for GPU inputs
    where it builds, else the PyTorch scan; STAR_SCAN=cuda, torch or ref forces one."""
    choice = os.environ.get("STAR_SCAN", "auto")
    if choice not in ("auto", "cuda", "torch", "ref"):
        raise ValueError(f"STAR_SCAN must be one of auto, cuda, torch, ref; got {choice!r}")
    if choice in ("torch", "ref"):
        return choice, "asked for by STAR_SCAN"
    dtypes = {t.dtype for t in (u, delta, z) if t is not None}
    if not u.is_cuda:
        why_not = "the inputs are on the CPU"
    elif len(dtypes) > 1 or not dtypes <= {torch.float32, torch.bfloat16, torch.float16}:
        why_not = "the kernel takes u, delta, z of one dtype: float32, bfloat16 or float16"
    elif A.shape[-1] > 64:
        why_not = f"the kernel takes state sizes up to 64, not {A.shape[-1]}"
    else:
        why_not = _cuda_kernel()[1]
    if why_not is None:
        return "cuda", "GPU inputs"
    if choice == "cuda":
        raise RuntimeError(f"STAR_SCAN=cuda, but the CUDA scan cannot run: {why_not}")
    return "torch", why_not


_backend_logged = set()


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """The scan the model calls: the CUDA kernel on a GPU, else the PyTorch scan (_scan_backend)."""
    backend, why = _scan_backend(u, delta, A, z)
    # one line per backend; not in torch.compile's trace, where a log call would split the graph
    if not torch.compiler.is_compiling() and backend not in _backend_logged:
        _backend_logged.add(backend)
        slow = backend == "torch" and u.is_cuda  # a warning if a GPU goes slow
        log.log(logging.WARNING if slow else logging.INFO, f"selective scan: {backend} ({why})")
    scan = {"cuda": selective_scan_cuda, "torch": selective_scan_torch, "ref": selective_scan_ref}
    return scan[backend](u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


# -----------------------------------------------------------------------------
# The model


@dataclass
class StarConfig:
    img_size: int = 32           # image side in pixels (square images)
    in_chans: int = 3            # 3 for RGB, 1 for grayscale
    patch: int = 4               # patch side in pixels: one token per patch
    cluster: int = 2             # c: c x c patches are predicted together (1 = next patch)
    images_per_seq: int = 4      # K: images packed into one pretraining sequence (STAR 4, ARM 1)
    separator: str = "cluster"   # before every image: "none", "token" (1) or "cluster" (c*c tokens)
    width: int = 192             # model width; the scan runs on expand * width channels
    depth: int = 12              # MambaMLP blocks
    d_state: int = 16            # n, the state size of every channel
    d_conv: int = 4              # kernel of the causal depthwise conv before the scan
    expand: int = 1              # ARM uses 1 (the MLP carries the width instead)
    mlp_ratio: float = 8 / 3     # SwiGLU hidden width / model width
    dec_width: int = 192         # ARM's decoder: cross-attention only (ARM-B uses 512)
    dec_depth: int = 4
    dec_heads: int = 3           # ARM's heads are 64 wide: dec_width // 64
    taps: int = 4                # encoder layers the decoder reads, in the upper half (ARM)
    num_classes: int = 10
    scan_dirs: int = 4           # classifier: 4 rows, columns both ways (ARM); 2 rows (Vim); 1
    scan_clusters: bool = False  # the classifier reads rows c x c patches at a time, as pretrained
    enc_pos: bool = True         # add the 2D positions to the encoder's tokens (False: an ablation)
    drop_path: float = 0.0       # stochastic depth at the last block (linearly less before it)

    def __post_init__(self):
        if self.img_size % self.patch:
            raise ValueError(f"img_size must be divisible by patch: got img_size={self.img_size}, "
                             f"patch={self.patch}")
        if self.grid % self.cluster:
            raise ValueError(f"the patch grid ({self.grid} per side) must be divisible by "
                             f"cluster, got cluster={self.cluster}")
        if self.separator not in ("none", "token", "cluster"):
            raise ValueError(f"separator must be 'none', 'token' or 'cluster', "
                             f"got {self.separator!r}")
        if self.scan_dirs not in (1, 2, 4):
            raise ValueError(f"scan_dirs must be 1, 2 or 4, got {self.scan_dirs}")
        if not 1 <= self.taps <= self.depth // 2 + 1:
            raise ValueError(f"taps must be 1 to depth // 2 + 1 = {self.depth // 2 + 1}: the "
                             f"decoder reads distinct layers of the encoder's upper half; got "
                             f"taps={self.taps}, depth={self.depth}")
        if self.dec_width % self.dec_heads:
            raise ValueError(f"dec_width must be divisible by dec_heads, got "
                             f"dec_width={self.dec_width}, dec_heads={self.dec_heads}")

    @property
    def grid(self):  # patches per side
        return self.img_size // self.patch

    @property
    def num_patches(self):  # N, the tokens of one image
        return self.grid ** 2

    @property
    def patch_dim(self):  # pixel values per patch
        return self.patch ** 2 * self.in_chans

    @property
    def sep_len(self):  # s, the tokens of one separator
        return {"none": 0, "token": 1, "cluster": self.cluster ** 2}[self.separator]

    @property
    def seq_len(self):  # L, the tokens of one packed sequence
        return self.images_per_seq * (self.sep_len + self.num_patches)


def causal_conv(x, weight, bias):
    """Depthwise causal conv over the last axis: x (..., d, l), weight (..., d, k), bias (..., d).
    Eager, cuDNN's conv1d; under torch.compile, k shifted multiply-adds, which fuse with their
    neighbours (compiled, conv1d stays cuDNN's kernel: 10 of a 4-direction step's 65 ms, H200)."""
    k = weight.shape[-1]
    l = x.shape[-1]
    if not torch.compiler.is_compiling():
        chans = weight.shape[:-1].numel()  # every direction's d channels
        u = F.conv1d(x.reshape(-1, chans, l), weight.reshape(chans, 1, k), bias.flatten(),
                     padding=k - 1, groups=chans)  # (b, chans, l + k - 1)
        return u[..., :l].view(x.shape[0], *weight.shape[:-1], l)  # the right padding cut
    x = F.pad(x, (k - 1, 0))  # (..., d, l + k - 1): zeros before the first token
    out = sum(weight[..., i:i + 1] * x[..., i:i + l] for i in range(k))  # (..., d, l), float32
    return (out + bias[..., None]).to(x.dtype)  # x's dtype, as conv1d under autocast


class _Reorder(torch.autograd.Function):
    """x (b, dirs or 1, d, l) -> (b, dirs, d, l): out[:, k, :, t] = x[:, k, :, perm[k, t]]. The
    backward gathers with the inverse permutation, not a scatter-add; a shared x (1 on dim 1)
    gets the sum of the directions' gradients."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        ctx.shared = x.shape[1] == 1
        return _gather_tokens(x, perm)

    @staticmethod
    def backward(ctx, grad):
        grad = _gather_tokens(grad, ctx.saved_tensors[0])  # (b, dirs, d, l)
        return grad.sum(1, keepdim=True) if ctx.shared else grad, None, None


def _gather_tokens(x, order):
    """x (b, dirs or 1, d, l), order (dirs, l) -> (b, dirs, d, l): x[:, k, :, order[k]]."""
    shape = (x.shape[0], order.shape[0], x.shape[2], order.shape[1])  # (b, dirs, d, l)
    return x.expand(shape).gather(3, order[None, :, None, :].expand(shape))


class MambaMixer(nn.Module):
    """Mamba: in_proj to (x, z), a causal conv and a selective scan per direction, gate, out_proj.

    Official implementation: state-spaces/mamba, mamba_ssm/modules/mamba_simple.py (Mamba).
    Pretraining scans one direction (causal); finetuning scans `dirs`, each in its own token order
    with its own conv, x_proj, dt_proj, A and D (a leading axis of size dirs), averaged before the
    gate as ARM does. All directions run as one conv, one matmul per projection and one scan with
    a group of B and C per direction. Unlike Mamba, x_proj and dt_proj are plain weight tensors.
    """

    def __init__(self, cfg, dirs=1, dt_min=1e-3, dt_max=0.1):
        super().__init__()
        d = cfg.expand * cfg.width
        n = cfg.d_state
        r = math.ceil(cfg.width / 16)  # dt_rank
        self.dirs = dirs
        self.split = [r, n, n]  # x_proj's output: Δ (low rank), B, C
        self.in_proj = nn.Linear(cfg.width, 2 * d, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(dirs, d, cfg.d_conv))  # depthwise, causal
        self.conv_bias = nn.Parameter(torch.empty(dirs, d))
        self.x_proj = nn.Parameter(torch.empty(dirs, r + 2 * n, d))
        self.dt_proj_weight = nn.Parameter(torch.empty(dirs, d, r))
        self.dt_proj_bias = nn.Parameter(torch.empty(dirs, d))
        A = torch.arange(1, n + 1.0).repeat(dirs, d, 1)  # (dirs, d, n): -A, Mamba's S4D-real init
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(dirs, d))
        self.out_proj = nn.Linear(d, cfg.width, bias=False)
        with torch.no_grad():
            # PyTorch's Conv1d default, ARM's 0.02 for x_proj (an nn.Linear there)
            nn.init.uniform_(self.conv_weight, -cfg.d_conv ** -0.5, cfg.d_conv ** -0.5)
            nn.init.uniform_(self.conv_bias, -cfg.d_conv ** -0.5, cfg.d_conv ** -0.5)
            nn.init.trunc_normal_(self.x_proj, std=0.02)
            # Mamba's Δ initialisation: softplus(bias) log-uniform in [dt_min, dt_max]
            nn.init.uniform_(self.dt_proj_weight, -r ** -0.5, r ** -0.5)
            log_dt = torch.rand(dirs, d) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
            dt = torch.exp(log_dt).clamp(min=1e-4)  # (dirs, d)
            self.dt_proj_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def forward(self, x, orders=None):
        """x (b, l, width); orders (perm, inverse), each (dirs, l), or None when causal."""
        b, l, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (b, l, d) each
        d = x.shape[-1]
        x = x.transpose(1, 2)[:, None]  # (b, 1, d, l)
        if orders is not None:
            x = _Reorder.apply(x, *orders)  # (b, dirs, d, l): each direction's token order
        elif self.dirs > 1:
            raise ValueError(f"this mixer scans {self.dirs} directions: pass their token orders")
        u = F.silu(causal_conv(x, self.conv_weight, self.conv_bias))  # (b, dirs, d, l)
        dt, B, C = (self.x_proj @ u).split(self.split, dim=2)  # B, C (b, dirs, n, l): a group each
        delta = (self.dt_proj_weight @ dt).flatten(1, 2)  # (b, dirs*d, l); bias added in the scan
        A = -torch.exp(self.A_log.float()).flatten(0, 1)  # (dirs*d, n)
        y = selective_scan(u.flatten(1, 2), delta, A, B, C, self.D.float().flatten(),
                           delta_bias=self.dt_proj_bias.float().flatten(), delta_softplus=True)
        y = y.view(b, self.dirs, d, l)  # (b, dirs, d, l)
        if orders is not None:
            y = _Reorder.apply(y, orders[1], orders[0])  # (b, dirs, d, l): back in token order
        y = y.mean(1).transpose(1, 2)  # (b, l, d)
        return self.out_proj(y * F.silu(z))  # (b, l, width)

    def step(self, x, state):
        """One token x (b, width), causal direction; state from init_state, updated in place."""
        conv_state, ssm_state = state  # (b, d, d_conv), (b, d, n)
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (b, d) each
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = x
        u = F.silu((conv_state * self.conv_weight[0]).sum(-1) + self.conv_bias[0])  # (b, d)
        dt, B, C = (u @ self.x_proj[0].T).split(self.split, dim=-1)  # (b, r), (b, n), (b, n)
        delta = F.softplus(dt @ self.dt_proj_weight[0].T + self.dt_proj_bias[0])  # (b, d)
        dA = torch.exp(delta[..., None] * -torch.exp(self.A_log[0].float()))  # (b, d, n)
        ssm_state.copy_(dA * ssm_state + (delta * u)[..., None] * B[:, None, :])
        y = (ssm_state * C[:, None, :]).sum(-1) + self.D[0] * u  # (b, d)
        return self.out_proj(y * F.silu(z))  # (b, width)

    def init_state(self, b):
        """Zero states for step: conv (b, d, d_conv), scan (b, d, n) in float32."""
        conv_state = self.conv_weight.new_zeros(b, *self.conv_weight.shape[1:])  # (b, d, d_conv)
        return conv_state, self.A_log.new_zeros(b, *self.A_log.shape[1:], dtype=torch.float32)


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
        self.norm1 = nn.LayerNorm(cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width)
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
    ang_y = ys.flatten()[:, None] * freq  # (N, width/4)
    ang_x = xs.flatten()[:, None] * freq  # (N, width/4)
    return torch.cat([ang_x.sin(), ang_x.cos(), ang_y.sin(), ang_y.cos()], dim=1)  # (N, width)


def patchify(imgs, p):
    """(b, C, H, W) -> (b, N, p*p*C): patches in raster order, pixels as (py, px, channel)."""
    b, chans, hh, ww = imgs.shape
    x = imgs.reshape(b, chans, hh // p, p, ww // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (hh // p) * (ww // p), p * p * chans)


def unpatchify(patches, p, chans):
    """(b, N, p*p*C) -> (b, C, H, W), the inverse of patchify for square images."""
    b, num, _ = patches.shape
    grid = math.isqrt(num)
    x = patches.reshape(b, grid, grid, p, p, chans)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, chans, grid * p, grid * p)


def cluster_order(grid, c):
    """(N,) raster index of the patch at every position: clusters, and patches in them, raster."""
    idx = torch.arange(grid * grid).view(grid // c, c, grid // c, c)  # (grid/c, c, grid/c, c)
    return idx.permute(0, 2, 1, 3).flatten()


def scan_orders(grid, dirs, c=1):
    """The classifier's token orders: rows forward/backward, columns forward/backward; with c > 1
    the rows go c x c patches at a time (cluster_order), as the pretraining read them.

    Returns perm and its inverse, both (dirs, N): direction i reads the tokens x[:, perm[i]].
    """
    rows = cluster_order(grid, c)  # (N,): raster when c = 1
    columns = torch.arange(grid * grid).view(grid, grid).T.flatten()  # (N,)
    perm = torch.stack([rows, rows.flip(0), columns, columns.flip(0)][:dirs])  # (dirs, N)
    return perm, torch.argsort(perm, dim=1)


class VisionMamba(nn.Module):
    """MambaMLP blocks over tokens (embed makes them from patches); returns taps_at's outputs."""

    def __init__(self, cfg, dirs=1):
        super().__init__()
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.width)  # a stride-p conv, on patches
        pos = sincos_2d(cfg.grid, cfg.width) * cfg.enc_pos  # (N, width); zeros with enc_pos off
        self.register_buffer("pos", pos, persistent=False)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(MambaMLPBlock(cfg, dirs, r) for r in rates)

    def embed(self, patches):
        """(b, N, p*p*C) raster order -> (b, N, width), with the same positions in every image
        (zeros with enc_pos off: then only the scan's order tells where a patch is)."""
        return self.patch_embed(patches) + self.pos

    def forward(self, x, taps_at=(), orders=None):
        """x (b, l, width) -> list of (b, l, width): one per index in taps_at, or the last."""
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
    """Inverse of pack_with_separators: (b/K, K*(s+N), width) -> (b, N, width), no separators."""
    return seq.unflatten(1, (K, -1))[:, :, s:].flatten(0, 1)  # (b, N, width)


def next_cluster_targets(cfg):
    """Which patches are targets and what each may see.

    Returns target (Q,): indices into the K*N image patches of a sequence (in sequence order), and
    visible (Q, L) bool: the target patch in cluster j of image k sees every sequence position
    before the first token of that cluster (the separator and all earlier images included),
    nothing after. Separators are never targets; the first cluster of the first image is no target
    when there is no separator to predict it from.
    """
    s = cfg.sep_len
    num = cfg.num_patches
    cc = cfg.cluster ** 2
    k = torch.arange(cfg.images_per_seq).repeat_interleave(num)  # (K*N,): the image of each patch
    i = torch.arange(num).repeat(cfg.images_per_seq)  # (K*N,): its position in that image
    cluster_start = k * (s + num) + s + (i // cc) * cc  # (K*N,): where its cluster starts
    visible = torch.arange(cfg.seq_len)[None, :] < cluster_start[:, None]  # (K*N, L)
    target = visible.any(1).nonzero().squeeze(1)  # (Q,)
    return target, visible[target]


def _patch_stats(patches, eps=1e-6):
    """The mean and std (..., 1) of every patch's pixels (..., p*p*C), as ARM normalises them."""
    mean = patches.mean(-1, keepdim=True)  # (..., 1)
    std = (patches.var(-1, keepdim=True) + eps).sqrt()  # (..., 1)
    return mean, std


def next_cluster_loss(pred, patches, per_target=False):
    """MSE against per-patch normalised pixels: each patch minus its mean, over its std.

    pred, patches (..., p*p*C). Returns the mean, or with per_target the MSE of every target (...).
    """
    mean, std = _patch_stats(patches)
    norm = ((patches - mean) / std).float()  # (..., p*p*C)
    if per_target:
        return F.mse_loss(pred.float(), norm, reduction="none").mean(-1)  # (...,)
    return F.mse_loss(pred.float(), norm)


class CrossBlock(nn.Module):
    """ARM's decoder layer: queries attend to encoder features (no self-attention), then an MLP."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x, mem, visible):
        """x (b, Q, e) queries; mem (b, L, e) this layer's encoder features; visible (Q, L) bool."""
        q = self.q(self.norm_q(x))  # (b, Q, e)
        key, value = self.kv(self.norm_kv(mem)).chunk(2, dim=-1)  # (b, L, e) each
        # split the heads: (b, heads, Q or L, e/heads)
        q, key, value = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, key, value))
        att = F.scaled_dot_product_attention(q, key, value, visible)  # (b, heads, Q, e/heads)
        x = x + self.proj(att.transpose(1, 2).flatten(2))  # (b, Q, e)
        return x + self.mlp(self.norm2(x))


def _init_linear(module):
    """ARM's (timm's) init for every nn.Linear: truncated normal 0.02 weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _check_images(imgs, model):
    want = (model.cfg.in_chans, model.cfg.img_size, model.cfg.img_size)
    if imgs.dim() != 4 or tuple(imgs.shape[1:]) != want:
        raise ValueError(f"expected images (b, {want[0]}, {want[1]}, {want[2]}) for this config, "
                         f"got {tuple(imgs.shape)}")
    device = next(model.parameters()).device
    if imgs.device != device:
        raise ValueError(f"images are on {imgs.device} but the model is on {device}")


class StarPretrain(nn.Module):
    """The causal Vision Mamba with ARM's decoder: the next cluster of every packed image."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionMamba(cfg, dirs=1)
        # one learnable vector, repeated sep_len times before every image
        sep = torch.empty(min(cfg.sep_len, 1), cfg.width)  # (1, width), or (0, width) for none
        self.separator = nn.Parameter(nn.init.trunc_normal_(sep, std=0.02))
        # ARM's taps: evenly spaced over the encoder's upper half, the last block included
        # (blocks 6, 8, 10, 12 of 12; 12, 16, 20, 24 of 24); 0-based indices here
        half = cfg.depth // 2
        gaps = max(cfg.taps - 1, 1)
        self.taps_at = [cfg.depth - 1 - half * (cfg.taps - 1 - i) // gaps for i in range(cfg.taps)]
        self.tap_norms = nn.ModuleList(nn.LayerNorm(cfg.width) for _ in self.taps_at)
        # one projection of the tapped features, split so each decoder layer reads its own (ARM)
        self.tap_proj = nn.Linear(cfg.taps * cfg.width, cfg.dec_depth * cfg.dec_width)
        # one shared query; each target adds its position
        self.query = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, cfg.dec_width), std=0.02))
        blocks = [CrossBlock(cfg.dec_width, cfg.dec_heads) for _ in range(cfg.dec_depth)]
        self.dec_blocks = nn.ModuleList(blocks)
        self.dec_norm = nn.LayerNorm(cfg.dec_width)
        self.dec_head = nn.Linear(cfg.dec_width, cfg.patch_dim)
        order = cluster_order(cfg.grid, cfg.cluster)  # (N,) raster index at every position
        target, visible = next_cluster_targets(cfg)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("target", target, persistent=False)  # (Q,)
        self.register_buffer("visible", visible, persistent=False)  # (Q, L)
        pos = sincos_2d(cfg.grid, cfg.dec_width)[order]  # (N, dec_width) in sequence order
        dec_pos = pos.repeat(cfg.images_per_seq, 1)[target]  # (Q, dec_width)
        self.register_buffer("dec_pos", dec_pos, persistent=False)
        _init_linear(self)

    def predict(self, imgs):
        """Teacher-forced next-cluster predictions. imgs (b, C, H, W), b divisible by K.

        Returns pred and patches, both (b/K, Q, p*p*C): the prediction and the true pixels of every
        target patch.
        """
        cfg = self.cfg
        _check_images(imgs, self)
        patches = patchify(imgs, cfg.patch)  # (b, N, p*p*C) in raster order
        tokens = self.encoder.embed(patches)[:, self.order]  # (b, N, width) in sequence order
        separator = self.separator.expand(cfg.sep_len, -1)  # (s, width): one vector, s times
        seq = pack_with_separators(tokens, separator, cfg.images_per_seq)  # (b/K, L, width)
        feats = self.encoder(seq, taps_at=self.taps_at)  # taps x (b/K, L, width)
        normed = [norm(f) for norm, f in zip(self.tap_norms, feats)]  # taps x (b/K, L, width)
        tapped = torch.cat(normed, dim=-1)  # (b/K, L, taps*width)
        mems = self.tap_proj(tapped).chunk(cfg.dec_depth, dim=-1)  # dec_depth x (b/K, L, e)
        x = (self.query + self.dec_pos).expand(seq.shape[0], -1, -1)  # (b/K, Q, e)
        for block, mem in zip(self.dec_blocks, mems):
            x = block(x, mem, self.visible)
        pred = self.dec_head(self.dec_norm(x))  # (b/K, Q, p*p*C)
        true = patches[:, self.order].reshape(seq.shape[0], -1, cfg.patch_dim)  # (b/K, K*N, p*p*C)
        return pred, true[:, self.target]

    def forward(self, imgs):
        """The STAR loss of a batch of images (b, C, H, W)."""
        return next_cluster_loss(*self.predict(imgs))

    def loss_by_slot(self, target_loss):
        """The loss by image slot (1..K) and part: an image's first cluster, or the rest.

        target_loss (Q,): next_cluster_loss(..., per_target=True) averaged over sequences. Returns a
        dict(slot, part, targets, loss) for every part that has targets (without a separator, slot 1
        has no "first"); their mean weighted by targets is target_loss's mean.
        """
        cfg = self.cfg
        slot = self.target // cfg.num_patches + 1  # (Q,)
        first = self.target % cfg.num_patches < cfg.cluster ** 2  # (Q,): in the first cluster
        rows = []
        for k in range(1, cfg.images_per_seq + 1):
            for part, where in (("first", first), ("rest", ~first)):
                sel = (slot == k) & where  # (Q,)
                if sel.any():
                    loss = target_loss[sel].mean().item()
                    rows.append(dict(slot=k, part=part, targets=int(sel.sum()), loss=loss))
        return rows

    def predicted_images(self, imgs):
        """Teacher-forced predictions as images (b, C, H, W), in each patch's true mean and std.

        The first cluster of the first image is kept as it is when it is no target.
        """
        cfg = self.cfg
        pred, true = self.predict(imgs)  # (b/K, Q, p*p*C) each
        mean, std = _patch_stats(true)  # (b/K, Q, 1) each
        patches = patchify(imgs, cfg.patch)[:, self.order]  # (b, N, p*p*C), a copy
        seqs = patches.view(pred.shape[0], -1, cfg.patch_dim)  # (b/K, K*N, p*p*C), same memory
        seqs[:, self.target] = (pred * std + mean).to(patches.dtype)
        return unpatchify(patches[:, torch.argsort(self.order)], cfg.patch, cfg.in_chans)


class StarClassifier(nn.Module):
    """Finetuning: the encoder on single images, cfg.scan_dirs directions, mean pooling, a head.

    ARM (four directions) also puts a cls token in the middle; we pool the patch tokens only: with 2
    or 4 directions every token already sees the whole image (with 1, as in the demo preset, what
    precedes it), and there is no token for load_pretrained to miss.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionMamba(cfg, dirs=cfg.scan_dirs)
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.num_classes)
        c = cfg.cluster if cfg.scan_clusters else 1
        perm, inverse = scan_orders(cfg.grid, cfg.scan_dirs, c)  # (dirs, N) each
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inverse", inverse, persistent=False)
        _init_linear(self)

    def features(self, imgs):
        """(b, C, H, W) -> (b, width): mean of the patch tokens."""
        _check_images(imgs, self)
        tokens = self.encoder.embed(patchify(imgs, self.cfg.patch))  # (b, N, width)
        x = self.encoder(tokens, orders=(self.perm, self.inverse))[-1]  # (b, N, width)
        return self.norm(x.mean(1))

    def forward(self, imgs):
        return self.head(self.features(imgs))  # (b, num_classes)

    def load_pretrained(self, state_dict):
        """Load a StarPretrain state dict: every scan direction starts from the causal one.

        Returns (missing, unexpected) key lists, as load_state_dict does.
        """
        own = self.state_dict()
        mapped = {}
        for key, value in state_dict.items():
            if ".mixer." in key and key in own and value.shape[0] == 1 < own[key].shape[0]:
                value = value.expand_as(own[key])  # (1, ...) -> (dirs, ...)
            mapped[key] = value
        result = self.load_state_dict(mapped, strict=False)
        return result.missing_keys, result.unexpected_keys


# -----------------------------------------------------------------------------
# Presets. Parameters of the classifier (cfg.scan_dirs scans) / of the pretraining model (decoder):
#   tiny   35,582 / 52,212        tests in seconds on a CPU; 16 tokens an image, K=2
#   demo   202,394 / 272,976      CPU demo, K=2: next-patch targets, one causal scan, both raster
#   cifar  5,629,642 / 7,464,432  32 px, patch 4, clusters of 2x2, K=4: 4 x (4 + 64) = 272 tokens
#   base   84,879,592 / 99,243,776  STAR-B: 192 px, patch 16, clusters of 4x4, K=4:
#          4 x (16 + 144) = 640 tokens; ARM-B has about 85M as a finetuned classifier
#          (finetuning at 224 px changes no parameter count)

PRESETS = {
    "tiny": StarConfig(img_size=32, patch=8, cluster=2, width=32, depth=2, d_state=4, dec_width=32,
                       dec_depth=1, dec_heads=2, taps=2, images_per_seq=2),  # tiny heads: 16 wide
    "demo": StarConfig(img_size=32, patch=8, cluster=1, width=64, depth=4, d_state=4, dec_width=64,
                       dec_depth=1, dec_heads=2, taps=2, images_per_seq=2, scan_dirs=1),
    "cifar": StarConfig(),
    "base": StarConfig(img_size=192, patch=16, cluster=4, width=768, depth=12, dec_width=512,
                       dec_heads=8, num_classes=1000),
}


def make_config(preset, **overrides):
    """A preset with fields replaced: make_config("cifar", images_per_seq=1, separator="none")."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **overrides)


def count_params(model):
    return sum(p.numel() for p in model.parameters())
