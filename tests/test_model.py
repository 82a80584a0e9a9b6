"""The model: causality of the STAR objective, separator packing, the recurrent step, presets,
loading."""
import pytest
import torch
import torch.nn.functional as F

import star


def tiny(**overrides):
    return star.make_config("tiny", **overrides)


def images(cfg, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g,
                       dtype=torch.float64)


@pytest.mark.parametrize("separator, cluster",
                         [("cluster", 2), ("token", 2), ("none", 2), ("cluster", 1)])
def test_predictions_never_see_their_own_cluster_or_later(separator, cluster):
    torch.manual_seed(0)
    cfg = tiny(separator=separator, cluster=cluster, images_per_seq=3)
    model = star.StarPretrain(cfg).double().eval()
    x = images(cfg, 3)
    pred, _ = model.predict(x)  # (1, Q, p*p*C)
    K = cfg.images_per_seq
    N = cfg.num_patches
    cc = cfg.cluster ** 2
    # raster patch at every sequence position
    order = star.cluster_order(cfg.grid, cfg.cluster)
    # (image, cluster) of every target, in sequence order; comparing tuples compares sequence
    # positions
    where = [(int(t) // N, (int(t) % N) // cc) for t in model.target]
    clusters = N // cc
    for k, j, i in [(k, j, i)
                    for k, j in [(0, 0), (0, clusters - 1), (1, 0), (1, clusters // 2),
                                 (K - 1, clusters - 1)]
                    for i in range(cc)]:
        y = x.clone()
        raster_patch = int(order[j * cc + i])  # patch i of cluster j
        row, col = divmod(raster_patch, cfg.grid)
        y[k, 0, row * cfg.patch, col * cfg.patch] += 5.0  # one pixel of cluster j of image k
        changed = (model.predict(y)[0] - pred).abs().amax(-1)[0] > 1e-12  # (Q,)
        for q, (kq, jq) in enumerate(where):
            if (kq, jq) <= (k, j):
                assert not changed[q], (f"target (image {kq}, cluster {jq}) saw a change in "
                                        f"image {k}, cluster {j}")
        later = [q for q, w in enumerate(where) if w > (k, j)]
        assert not later or changed[later].any(), "a change never reached any later prediction"


def visibility_by_walking(cfg):
    """What every image patch may see, from the packed layout written out token by token.

    Returns one row per image patch in sequence order: the sequence positions before the first
    token of its cluster (the positions its cluster's prediction may read)."""
    separator_tokens = {"none": 0, "token": 1, "cluster": cfg.cluster ** 2}[cfg.separator]
    patches_per_cluster = cfg.cluster ** 2
    clusters_per_image = cfg.num_patches // patches_per_cluster
    layout = []  # per sequence position: "separator" or (image, cluster)
    for image in range(cfg.images_per_seq):
        layout += ["separator"] * separator_tokens
        for cluster in range(clusters_per_image):
            layout += [(image, cluster)] * patches_per_cluster
    rows = []
    for token in layout:
        if token != "separator":
            first = layout.index(token)  # where this patch's cluster starts
            rows.append([position < first for position in range(len(layout))])
    return torch.tensor(rows)  # (K*N, L)


@pytest.mark.parametrize("separator", ["none", "token", "cluster"])
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("cluster", [1, 2, 4])
def test_every_target_sees_everything_before_its_cluster(separator, K, cluster):
    # its own separator and the cluster just before it included; checked against the layout
    # walked token by token, not against star's arithmetic
    cfg = tiny(separator=separator, images_per_seq=K, cluster=cluster)
    model = star.StarPretrain(cfg)
    want = visibility_by_walking(cfg)  # (K*N, L)
    assert want.shape == (K * cfg.num_patches, cfg.seq_len)
    targets = want.any(1).nonzero().squeeze(1)  # a patch with something before it is a target
    got_targets = model.target  # (Q,)
    got_visible = model.visible  # (Q, L)
    assert got_targets.tolist() == targets.tolist()
    wrong = (got_visible != want[targets]).any(1).nonzero().squeeze(1).tolist()
    assert not wrong, f"targets {got_targets[wrong].tolist()} see other positions than they should"
    s = cfg.sep_len
    N = cfg.num_patches
    if K > 1:  # the first cluster of image 1 sees its separator and all of image 0, no more
        first_of_image_1 = got_targets.tolist().index(N)
        assert got_visible[first_of_image_1].sum() == 2 * s + N


def test_cluster_order_written_out():
    # the sequence order of the patches, as raster indices, written out by hand
    assert star.cluster_order(4, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7,
                                                 8, 9, 12, 13, 10, 11, 14, 15]
    # a 6x6 grid of 2x2 clusters: 3 clusters a row, so c and grid/c differ
    assert star.cluster_order(6, 2).tolist() == [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11,
                                                 12, 13, 18, 19, 14, 15, 20, 21, 16, 17, 22, 23,
                                                 24, 25, 30, 31, 26, 27, 32, 33, 28, 29, 34, 35]
    assert star.cluster_order(4, 1).tolist() == list(range(16))  # next patch: raster order
    assert star.cluster_order(4, 4).tolist() == list(range(16))  # one cluster: raster inside


def test_every_image_gets_the_same_separator_and_unpacking_inverts_packing():
    cfg = tiny(images_per_seq=4)
    s = cfg.sep_len
    N = cfg.num_patches
    sep = torch.randn(s, 8)
    tokens = torch.randn(8, N, 8)
    seq = star.pack_with_separators(tokens, sep, K=4)
    assert seq.shape == (2, cfg.seq_len, 8) and cfg.seq_len == 4 * (N + s)
    for k in range(4):
        start = k * (s + N)
        assert torch.equal(seq[:, start:start + s], sep.expand(2, s, 8))
        assert torch.equal(seq[:, start + s:start + s + N], tokens.view(2, 4, N, 8)[:, k])
    assert torch.equal(star.unpack_images(seq, 4, s), tokens)
    with pytest.raises(ValueError, match="divisible by images_per_seq"):
        star.pack_with_separators(tokens[:7], sep, K=4)


@pytest.mark.parametrize("separator, untargeted", [("cluster", 0), ("token", 0), ("none", 4)])
def test_targets_are_exactly_the_image_patches(separator, untargeted):
    cfg = tiny(separator=separator, images_per_seq=2)
    model = star.StarPretrain(cfg).double()
    x = images(cfg, 4)
    pred, target = model.predict(x)
    K = cfg.images_per_seq
    N = cfg.num_patches
    assert pred.shape == target.shape == (2, K * N - untargeted, cfg.patch_dim)
    in_seq_order = star.patchify(x, cfg.patch)[:, model.order].reshape(2, K * N, -1)
    # no separator position is ever a target
    assert torch.equal(target, in_seq_order[:, untargeted:])
    # the loss is the MSE to per-patch normalised pixels of those targets
    norm = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(model(x), ((pred - norm) ** 2).mean().float())


def test_separator_gets_gradient_only_when_present():
    x = images(tiny(), 4).float()
    model = star.StarPretrain(tiny(separator="cluster"))
    model(x).backward()
    assert model.separator.grad.abs().sum() > 0
    assert star.StarPretrain(tiny(separator="none")).separator.numel() == 0


def test_token_and_cluster_separators_differ_in_length_only():
    # one learnable vector, repeated: the same weights run as a one-token or a whole-cluster
    # separator
    torch.manual_seed(0)
    token = star.StarPretrain(tiny(separator="token"))
    cluster = star.StarPretrain(tiny(separator="cluster"))
    assert token.separator.shape == cluster.separator.shape == (1, tiny().width)
    cluster.load_state_dict(token.state_dict())  # strict: every key and shape agrees
    seen = []
    cluster.encoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    cluster(images(tiny(), 2).float())
    s = cluster.cfg.sep_len
    assert s == 4 and torch.equal(seen[0][:, :s], token.separator.expand(1, s, -1))


@pytest.mark.parametrize("depth, taps, blocks", [(12, 4, [6, 8, 10, 12]), (24, 4, [12, 16, 20, 24]),
                                                 (2, 2, [1, 2]), (12, 1, [12]), (5, 3, [3, 4, 5])])
def test_taps_are_spread_over_the_upper_half_as_in_arm(depth, taps, blocks):
    cfg = tiny(depth=depth, taps=taps)
    assert [i + 1 for i in star.StarPretrain(cfg).taps_at] == blocks  # 1-based, as ARM counts
    with pytest.raises(ValueError, match="taps must be 1 to depth // 2 \\+ 1"):
        tiny(depth=depth, taps=depth // 2 + 2)


def test_each_decoder_layer_reads_its_own_memory():
    torch.manual_seed(0)
    model = star.StarPretrain(tiny(dec_depth=3))
    projected = []
    mems = []
    model.tap_proj.register_forward_hook(lambda m, args, out: projected.append(out))
    for block in model.dec_blocks:
        block.register_forward_pre_hook(lambda m, args: mems.append(args[1]))
    model(images(tiny(), 2).float())
    chunks = projected[0].chunk(3, dim=-1)  # (b/K, L, dec_width) each
    assert projected[0].shape[-1] == 3 * model.cfg.dec_width
    for i in range(3):
        assert torch.equal(mems[i], chunks[i]), f"decoder layer {i} does not read chunk {i}"
    assert not torch.allclose(mems[0], mems[1])


@pytest.mark.parametrize("separator", ["cluster", "token", "none"])
def test_loss_by_slot_parts_add_up_to_the_loss(separator):
    torch.manual_seed(0)
    cfg = tiny(separator=separator, images_per_seq=3)
    model = star.StarPretrain(cfg).double()
    x = images(cfg, 6)
    per_target = star.next_cluster_loss(*model.predict(x), per_target=True)  # (2, Q)
    torch.testing.assert_close(per_target.mean(), model(x))
    rows = model.loss_by_slot(per_target.mean(0))
    cc = cfg.cluster ** 2
    N = cfg.num_patches
    want = [(k, part, n) for k in (1, 2, 3) for part, n in (("first", cc), ("rest", N - cc))]
    if separator == "none":
        want = want[1:]  # nothing comes before the first cluster of slot 1: no target
    assert [(r["slot"], r["part"], r["targets"]) for r in rows] == want
    total = sum(r["loss"] * r["targets"] for r in rows) / sum(r["targets"] for r in rows)
    assert abs(total / model(x).item() - 1) < 1e-6  # the loss is float32
    # each part is the mean over its own targets: slot 2's first cluster follows slot 1's targets
    start = N - (cc if separator == "none" else 0)
    assert abs(rows[-4]["loss"] / per_target[:, start:start + cc].mean().item() - 1) < 1e-6


def test_recurrent_step_equals_parallel_forward():
    torch.manual_seed(0)
    cfg = tiny(width=16, d_state=8)
    mixer = star.MambaMixer(cfg).double()
    x = torch.randn(3, 11, cfg.width, dtype=torch.float64)
    parallel = mixer(x)  # (b, l, width)
    state = mixer.init_state(3)
    state = (state[0].double(), state[1].double())
    steps = torch.stack([mixer.step(x[:, t], state) for t in range(x.shape[1])], dim=1)
    torch.testing.assert_close(steps, parallel, rtol=1e-10, atol=1e-10)


def per_direction_loop(mixer, x, perm, inverse):
    """The mixer written as one plain scan per direction (each its own conv, x_proj,
    dt_proj, A, D)."""
    b, l, _ = x.shape
    x, z = mixer.in_proj(x).chunk(2, dim=-1)  # (b, l, d) each
    d = x.shape[-1]
    k = mixer.conv_weight.shape[-1]
    ys = []
    for i in range(mixer.dirs):
        u = F.conv1d(x[:, perm[i]].transpose(1, 2), mixer.conv_weight[i][:, None],
                     mixer.conv_bias[i], padding=k - 1, groups=d)
        u = F.silu(u[..., :l])  # (b, d, l)
        dt, B, C = (mixer.x_proj[i] @ u).split(mixer.split, dim=1)
        # A, D and the Δ bias in float32, as the mixer hands them to the scan
        A = -mixer.A_log[i].float().exp()
        y = star.selective_scan_ref(u, mixer.dt_proj_weight[i] @ dt, A, B, C, mixer.D[i].float(),
                                    delta_bias=mixer.dt_proj_bias[i].float(), delta_softplus=True)
        ys.append(y[:, :, inverse[i]])  # (b, d, l) in token order
    return mixer.out_proj(torch.stack(ys).mean(0).transpose(1, 2) * F.silu(z))


@pytest.mark.parametrize("dirs", [1, 2, 4])
def test_stacked_directions_equal_one_scan_per_direction(dirs):
    torch.manual_seed(0)
    cfg = tiny(width=16, d_state=4)
    mixer = star.MambaMixer(cfg, dirs).double()
    with torch.no_grad():  # distinct directions, so a mix-up between them shows
        for p in (mixer.conv_weight, mixer.x_proj, mixer.dt_proj_bias, mixer.A_log, mixer.D):
            p.add_(0.3 * torch.randn_like(p))
    perm = torch.stack([torch.randperm(16) for _ in range(dirs)])  # (dirs, l): not self-inverse
    inverse = torch.argsort(perm, dim=1)
    x = torch.randn(3, 16, cfg.width, dtype=torch.float64, requires_grad=True)
    got = mixer(x, orders=(perm, inverse))
    want = per_direction_loop(mixer, x, perm, inverse)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    grads = torch.autograd.grad(got.square().sum(), [x, *mixer.parameters()])
    grads_want = torch.autograd.grad(want.square().sum(), [x, *mixer.parameters()])
    for g, w in zip(grads, grads_want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)


def test_several_directions_without_orders_is_an_error():
    mixer = star.MambaMixer(tiny(), dirs=4)
    with pytest.raises(ValueError, match="scans 4 directions: pass their token orders"):
        mixer(torch.randn(2, 16, tiny().width))


def test_preset_parameter_counts():
    # the counts in the comment above star.PRESETS: classifier / pretraining model
    counts = {"tiny": (35_582, 52_212), "cifar": (5_629_642, 7_464_432),
              "base": (84_879_592, 99_243_776)}
    for name, want in counts.items():
        cfg = star.make_config(name)
        got = (star.count_params(star.StarClassifier(cfg)),
               star.count_params(star.StarPretrain(cfg)))
        assert got == want, (name, got)
    assert abs(counts["base"][0] / 85e6 - 1) <= 0.03  # ARM-B as finetuned: about 85M
    assert star.make_config("base").seq_len == 640 and star.make_config("cifar").seq_len == 272
    for name in ("cifar", "base"):  # ARM's decoder heads are 64 wide
        assert star.make_config(name).dec_width // star.make_config(name).dec_heads == 64


def test_a_few_steps_drive_the_loss_down():
    torch.manual_seed(0)
    cfg = tiny()
    model = star.StarPretrain(cfg)
    coarse = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    # smooth, so predictable images
    x = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("dirs", [1, 2, 4])
def test_classifier_loads_pretrained_weights_into_every_direction(dirs):
    torch.manual_seed(0)
    pre = star.StarPretrain(tiny())
    clf = star.StarClassifier(tiny(scan_dirs=dirs))
    missing, unexpected = clf.load_pretrained(pre.state_dict())
    assert sorted(missing) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert "separator" in unexpected and all(not k.startswith("encoder.") for k in unexpected)
    for name in ("A_log", "D", "conv_weight", "conv_bias", "x_proj", "dt_proj_weight",
                 "dt_proj_bias"):
        got = clf.state_dict()[f"encoder.blocks.1.mixer.{name}"]  # (dirs, ...)
        want = pre.state_dict()[f"encoder.blocks.1.mixer.{name}"]  # (1, ...)
        assert got.shape[0] == dirs and torch.equal(got, want.expand_as(got))
    assert clf(images(tiny(), 2).float()).shape == (2, 10)


def test_four_way_classifier_sees_both_directions():
    # the causal classifier's first token ignores later tokens; four-way scans do not
    torch.manual_seed(0)
    x = images(tiny(), 1)
    y = x.clone()
    y[..., -1, -1] += 5.0  # a pixel of the last patch
    for dirs, should_change in [(1, False), (4, True)]:
        enc = star.StarClassifier(tiny(scan_dirs=dirs)).double().eval()

        def tokens(im):
            return enc.encoder(enc.encoder.embed(star.patchify(im, 8)),
                               orders=(enc.perm, enc.inverse))[-1][:, 0]
        assert (not torch.allclose(tokens(x), tokens(y), rtol=0, atol=1e-12)) == should_change


def test_without_encoder_positions_a_patch_embeds_the_same_anywhere():
    torch.manual_seed(0)
    same = torch.ones(1, tiny().num_patches, tiny().patch_dim)  # one patch, everywhere
    for enc_pos in (True, False):
        model = star.StarPretrain(tiny(enc_pos=enc_pos))
        tokens = model.encoder.embed(same)[0]  # (N, width)
        assert torch.allclose(tokens, tokens[:1].expand_as(tokens)) == (not enc_pos)
        # the decoder's queries keep their positions either way: one per target cluster's patch
        assert len(torch.unique(model.dec_pos[:model.cfg.num_patches], dim=0)) > 1


def test_classifier_in_cluster_order_reads_tokens_as_pretraining_did():
    # one causal direction in the pretraining's order: the same features token by token
    torch.manual_seed(0)
    cfg = tiny(images_per_seq=1, separator="none", scan_dirs=1)
    pre = star.StarPretrain(cfg).double().eval()
    x = images(cfg, 2)
    seq = pre.encoder.embed(star.patchify(x, cfg.patch))[:, pre.order]  # (b, N, width)
    want = pre.encoder(seq)[-1]  # (b, N, width) in cluster order
    for scan_clusters in (True, False):
        clf = star.StarClassifier(tiny(images_per_seq=1, separator="none", scan_dirs=1,
                                       scan_clusters=scan_clusters)).double().eval()
        clf.load_pretrained(pre.state_dict())
        tokens = clf.encoder.embed(star.patchify(x, cfg.patch))  # (b, N, width) raster
        got = clf.encoder(tokens, orders=(clf.perm, clf.inverse))[-1][:, pre.order]
        assert torch.allclose(got, want, atol=1e-10) == scan_clusters


@pytest.mark.parametrize("overrides, message", [
    (dict(img_size=30), "img_size must be divisible by patch"),
    (dict(cluster=3), "must be divisible by cluster"),
    (dict(separator="dot"), "separator must be"),
])
def test_bad_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_bad_images_raise():
    model = star.StarPretrain(tiny())
    with pytest.raises(ValueError, match=r"expected images \(b, 3, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))  # wrong channel count
    with pytest.raises(ValueError, match="divisible by images_per_seq"):
        model(torch.randn(3, 3, 32, 32))
    with pytest.raises(ValueError, match="model is on cpu"):
        model(torch.randn(2, 3, 32, 32, device="meta"))
    with pytest.raises(ValueError, match="unknown preset"):
        star.make_config("huge")


@pytest.mark.parametrize("make", [star.StarPretrain, star.StarClassifier])
def test_the_model_traces_into_one_graph(make, monkeypatch):
    """torch.compile (train.py --compile) sees each model as one graph: nothing in a forward (a
    log line, a .item()) splits it, even on the first call, when the scan says which one runs."""
    monkeypatch.setattr(star, "_backend_logged", set())  # as in a fresh process
    cfg = tiny(scan_dirs=2)
    model = torch.compile(make(cfg), fullgraph=True, backend="eager")  # fullgraph: break = error
    model(images(cfg, 2 * cfg.images_per_seq).float())


def test_causal_conv_compiled_form_equals_conv1d(monkeypatch):
    """causal_conv's two forms: conv1d (eager) and the shifted multiply-adds torch.compile sees."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 10, dtype=torch.float64, requires_grad=True)  # (b, dirs, d, l)
    w = torch.randn(4, 8, 4, dtype=torch.float64, requires_grad=True)  # (dirs, d, k)
    bias = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    want = star.causal_conv(x, w, bias)
    grads_want = torch.autograd.grad(want.square().sum(), [x, w, bias])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = star.causal_conv(x, w, bias)
    torch.testing.assert_close(got, want)
    for g, gw in zip(torch.autograd.grad(got.square().sum(), [x, w, bias]), grads_want):
        torch.testing.assert_close(g, gw)
    causal = star.causal_conv(torch.cat([x, x], dim=-1), w, bias)[..., :10]  # later tokens unseen
    torch.testing.assert_close(causal, want)
