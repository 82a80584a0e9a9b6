"""The scans against Mamba's equations and each other; errors on bad input; the backend switch."""
import math

import pytest
import torch

import star


def make_inputs(b, d, n, l, groups=1, dtype=torch.float32, seed=0, big_delta=False):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=dtype)

    u = r(b, d, l)
    z = r(b, d, l)
    delta = torch.rand(b, d, l, generator=g, dtype=dtype) * (10 if big_delta else 1)
    # (d, n), negative
    A = -torch.rand(d, n, generator=g, dtype=dtype) * (16 if big_delta else 2) - 0.1
    Bshape = (b, n, l) if groups == 1 else (b, groups, n, l)
    B = r(*Bshape)
    C = r(*Bshape)
    D = r(d)
    bias = r(d)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias)


def run(fn, inp, use, softplus, last):
    """Output, last state and gradients of every input that takes part, for a fixed random loss."""
    args = {k: (v.clone().requires_grad_() if k in use or k in "u delta A B C" else None)
            for k, v in inp.items()}
    res = fn(**args, delta_softplus=softplus, return_last_state=last)
    out, h = res if last else (res, None)
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    if last:
        loss = loss + (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum()
    names = [k for k, v in args.items() if v is not None]
    grads = torch.autograd.grad(loss, [args[k] for k in names])
    return {"out": out, "h": h, **{f"grad_{k}": v for k, v in zip(names, grads)}}


def assert_match(got, want, rtol, atol_frac):
    for key in want:
        if want[key] is None:
            assert got[key] is None
            continue
        scale = want[key].abs().max().item() + 1e-30
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=atol_frac * scale,
                                   msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("l", [1, 7, 64, 197, 260, 1000])
@pytest.mark.parametrize("n", [1, 16])
@pytest.mark.parametrize("groups", [1, 2])
def test_torch_scan_matches_reference_all_options(l, n, groups):
    inp = make_inputs(2, 4, n, l, groups, seed=l + n + groups)
    use = {"D", "z", "delta_bias"}
    want = run(star.selective_scan_ref, inp, use, True, True)
    got = run(star.selective_scan_torch, inp, use, True, True)
    assert_match(got, want, rtol=1e-5, atol_frac=1e-5)


@pytest.mark.parametrize("use", [set(), {"D"}, {"z"}, {"delta_bias"}, {"D", "z"}])
@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("last", [False, True])
def test_torch_scan_matches_reference_each_option(use, softplus, last):
    inp = make_inputs(2, 6, 16, 33, groups=2, seed=len(use) + 2 * softplus + 4 * last)
    want = run(star.selective_scan_ref, inp, use, softplus, last)
    got = run(star.selective_scan_torch, inp, use, softplus, last)
    assert_match(got, want, rtol=1e-5, atol_frac=1e-5)


def scan_by_hand(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Mamba's equations in plain Python floats, one batch, channel and step at a time:
    Δ = softplus(delta + bias) (or delta + bias), h = exp(ΔA) h + Δ B u, y = (C h + D u) silu(z).
    B, C (b, g, n, l): channel c reads group c // (d / g)."""
    b, d, l = u.shape
    n = A.shape[1]
    per_group = d // B.shape[1]
    out = torch.zeros(b, d, l, dtype=torch.float64)
    for i in range(b):
        for c in range(d):
            grp = c // per_group
            h = [0.0] * n
            for t in range(l):
                step = float(delta[i, c, t] + delta_bias[c])
                if delta_softplus:
                    step = math.log(1.0 + math.exp(step))
                x = float(u[i, c, t])
                y = float(D[c]) * x
                for j in range(n):
                    decay = math.exp(step * float(A[c, j]))
                    h[j] = decay * h[j] + step * float(B[i, grp, j, t]) * x
                    y += float(C[i, grp, j, t]) * h[j]
                if z is not None:
                    gate = float(z[i, c, t])
                    y *= gate / (1.0 + math.exp(-gate))  # silu
                out[i, c, t] = y
    return out


@pytest.mark.parametrize("fn", [star.selective_scan_ref, star.selective_scan_torch])
@pytest.mark.parametrize("gate, softplus", [(True, False), (True, True), (False, False)])
def test_gate_and_softplus_flag_match_mambas_equations(fn, gate, softplus):
    # the reference and the PyTorch scan share the code that applies the gate and softplus, so
    # comparing them with each other cannot catch a mistake there
    inp = make_inputs(2, 4, 3, 9, groups=2, dtype=torch.float64, seed=11)
    if not gate:
        inp["z"] = None
    got = fn(**inp, delta_softplus=softplus)
    want = scan_by_hand(**inp, delta_softplus=softplus)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_torch_scan_matches_reference_float64():
    inp = make_inputs(2, 4, 16, 260, groups=2, dtype=torch.float64, seed=3)
    use = {"D", "z", "delta_bias"}
    want = run(star.selective_scan_ref, inp, use, True, True)
    got = run(star.selective_scan_torch, inp, use, True, True)
    assert_match(got, want, rtol=1e-10, atol_frac=1e-10)


def test_half_precision_inputs_give_output_in_input_dtype():
    inp = make_inputs(2, 4, 16, 20, seed=4)
    inp16 = {k: (v.to(torch.bfloat16) if k in ("u", "delta", "z") else v) for k, v in inp.items()}
    got = star.selective_scan_torch(**inp16, delta_softplus=True)
    want = star.selective_scan_ref(**inp16, delta_softplus=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def test_gradcheck_float64():
    inp = make_inputs(1, 2, 3, 5, groups=2, dtype=torch.float64, seed=5)
    keys = list(inp)

    def fn(*xs):
        return star.selective_scan_torch(**dict(zip(keys, xs)), delta_softplus=True,
                                         return_last_state=True)

    assert torch.autograd.gradcheck(fn, [v.requires_grad_() for v in inp.values()])


def test_large_delta_times_A_stays_finite():
    inp = make_inputs(2, 8, 16, 300, seed=6, big_delta=True)  # delta up to 10, A down to -16
    got = run(star.selective_scan_torch, inp, {"D", "z"}, False, True)
    for key, value in got.items():
        assert value is None or torch.isfinite(value).all(), key
    want = run(star.selective_scan_ref, inp, {"D", "z"}, False, True)
    assert_match(got, want, rtol=1e-5, atol_frac=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(u=torch.zeros(2, 4)), "u must be (b, d, l)"),
    (dict(A=torch.zeros(5, 16)), "A must be (d, n)"),
    (dict(delta=torch.zeros(2, 4, 9)), "delta must have u's shape"),
    (dict(B=torch.zeros(2, 8, 10)), "B must be (b, n, l)"),
    (dict(C=torch.zeros(2, 3, 16, 10)), "divisible by g"),
    (dict(D=torch.zeros(3)), "D must be (d,)"),
    (dict(delta_bias=torch.zeros(4, device="meta")), "one device"),
])
def test_bad_scan_inputs_raise_clear_errors(change, message):
    inp = make_inputs(2, 4, 16, 10)
    inp.update(change)
    for fn in (star.selective_scan_ref, star.selective_scan_torch, star.selective_scan):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            fn(**inp)


def test_backend_switch(monkeypatch):
    inp = make_inputs(1, 2, 4, 6)
    calls = []
    for name in ("selective_scan_ref", "selective_scan_torch"):
        real = getattr(star, name)
        monkeypatch.setattr(star, name,
                            lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    # auto on CPU inputs is the PyTorch scan
    for choice, expected in [("ref", "selective_scan_ref"), ("torch", "selective_scan_torch"),
                             ("auto", "selective_scan_torch")]:
        monkeypatch.setenv("STAR_SCAN", choice)
        star.selective_scan(**inp)
        assert calls[-1] == expected
    monkeypatch.setenv("STAR_SCAN", "fast")
    with pytest.raises(ValueError, match="STAR_SCAN must be one of"):
        star.selective_scan(**inp)
    monkeypatch.setenv("STAR_SCAN", "cuda")
    with pytest.raises(RuntimeError, match="cannot run"):
        star.selective_scan(**inp)


def test_autocast_does_not_lower_the_scan_precision():
    inp = make_inputs(2, 4, 16, 40, seed=7)
    want = star.selective_scan_ref(**inp, delta_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = star.selective_scan_torch(**inp, delta_softplus=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_torch_scan_is_not_slower_than_reference_on_cpu():
    import time
    inp = make_inputs(8, 192, 16, 272, seed=8)
    times = {}
    for name, fn in (("torch", star.selective_scan_torch), ("ref", star.selective_scan_ref)):
        args = {k: v.requires_grad_() for k, v in inp.items()}
        start = time.perf_counter()
        fn(**args, delta_softplus=True).sum().backward()
        times[name] = time.perf_counter() - start
    assert times["torch"] <= times["ref"], times  # measured here: about 70 ms against 2.8 s
