"""CrossModalNet: shapes for 1-3 modalities, any subset, gradients, order-free fusion, determinism, dropouts."""

import itertools

import pytest
import torch
from crossmodal.config import load_config
from crossmodal.nets import CrossModalNet, build_network

SIZE = 16


def small(names, **kw):
    torch.manual_seed(0)
    return CrossModalNet(names, num_classes=4, channels=(8, 16, 32), strides=(2, 2), **kw)


@pytest.mark.parametrize("names", [["ct"], ["ct", "pet"], ["t1", "t2", "pd"]])
def test_output_shapes(names):
    net = small(names).eval()
    out = net(torch.randn(2, len(names), SIZE, SIZE, SIZE))
    assert tuple(out.fused.shape) == (2, 4, SIZE, SIZE, SIZE)
    assert sorted(out.per_modality) == sorted(names)
    assert all(tuple(v.shape) == (2, 4, SIZE, SIZE, SIZE) for v in out.per_modality.values())
    assert [tuple(d.shape) for d in out.independent[names[0]]] == [(2, 2), (2, 4), (2, 8)]
    assert set(out.as_dict()) == {"fused", *names}


def test_every_subset_runs_and_reports_only_present_modalities():
    names = ["t1", "t2", "pd"]
    net = small(names).eval()
    x = torch.randn(1, 3, SIZE, SIZE, SIZE)
    for r in (1, 2, 3):
        for subset in itertools.combinations(range(3), r):
            present = [i in subset for i in range(3)]
            out = net(x, present=present)
            assert sorted(out.per_modality) == sorted(names[i] for i in subset)
            as_dict = net({names[i]: x[:, i : i + 1] for i in subset})
            torch.testing.assert_close(out.fused, as_dict.fused)
    # an absent modality's values do not matter
    y = x.clone()
    y[:, 1] = 1e3
    torch.testing.assert_close(net(x, present=[True, False, True]).fused, net(y, present=[True, False, True]).fused)


def test_gradient_reaches_every_encoder_and_head():
    net = small(["ct", "pet", "mr"]).train()
    out = net(torch.randn(1, 3, SIZE, SIZE, SIZE))
    (out.fused.mean() + sum(v.mean() for v in out.per_modality.values())).backward()
    for name, enc in net.encoders.items():
        grads = [p.grad for p in enc.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is not None for p in net.aux.parameters())


def test_fusion_does_not_depend_on_modality_order():
    net = small(["ct", "pet", "mr"]).eval()
    x = {m: torch.randn(1, 1, SIZE, SIZE, SIZE) for m in ("ct", "pet", "mr")}
    a = net(x).fused
    for perm in itertools.permutations(x):
        torch.testing.assert_close(net({m: x[m] for m in perm}).fused, a)
    level = net.fusion[1]
    feats = {m: torch.randn(1, 8, 4, 4, 4) for m in ("ct", "pet", "mr")}
    torch.testing.assert_close(level(feats), level(dict(reversed(list(feats.items())))))


def test_eval_is_deterministic_and_mc_dropout_samples():
    net = small(["ct", "pet"], dropout=0.3).eval()
    x = torch.randn(1, 2, SIZE, SIZE, SIZE)
    torch.testing.assert_close(net(x).fused, net(x).fused)
    net.mc_dropout = True
    assert not torch.allclose(net(x).fused, net(x).fused)


def test_modality_dropout_never_drops_all():
    net = small(["a", "b", "c"], modality_dropout=0.7).train()
    torch.manual_seed(1)
    seen = [frozenset(net(torch.randn(1, 3, SIZE, SIZE, SIZE)).per_modality) for _ in range(20)]
    assert all(len(s) >= 1 for s in seen) and len(set(seen)) > 2
    assert set(net.eval()(torch.randn(1, 3, SIZE, SIZE, SIZE)).per_modality) == {"a", "b", "c"}


def test_bad_inputs_are_named():
    net = small(["ct", "pet"])
    with pytest.raises(ValueError, match="input has 3 channels, the network expects 2"):
        net(torch.randn(1, 3, SIZE, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"unknown modalities \['mr'\]"):
        net({"mr": torch.randn(1, 1, SIZE, SIZE, SIZE)})
    with pytest.raises(ValueError, match="at least one modality"):
        net(torch.randn(1, 2, SIZE, SIZE, SIZE), present=[False, False])


def test_built_from_yaml():
    cfg = load_config("brain", overrides={"model": {"name": "crossmodal", "encoder_channels": [4, 8, 16, 32]}})
    net = build_network(cfg)
    assert isinstance(net, CrossModalNet) and net.modalities == ["t1", "t2", "pd"]
    assert net.encoders["t1"].levels[0][0].out_channels == 4


def test_mc_dropout_per_call_leaves_the_network_deterministic():
    net = small(["ct", "pet"], dropout=0.3).eval()
    x = torch.randn(1, 2, SIZE, SIZE, SIZE)
    assert not torch.allclose(net(x, mc_dropout=True).fused, net(x, mc_dropout=True).fused)
    assert net.mc_dropout is False
    torch.testing.assert_close(net(x).fused, net(x).fused)


def test_per_sample_modality_subsets_match_separate_forwards():
    """One batch, each sample its own modality subset: every fused output equals that sample run alone on its subset
    (instance norm keeps samples independent), and the plain path is untouched."""
    names = ["t1", "t2", "pd"]
    net = small(names, dropout=0.0).eval()
    x = torch.randn(3, 3, SIZE, SIZE, SIZE)
    mask = torch.tensor([[True, True, True], [True, False, False], [False, True, True]])
    with torch.no_grad():
        out = net(x, sample_present=mask).fused
        for b in range(3):
            alone = net({m: x[b : b + 1, i : i + 1] for i, m in enumerate(names) if mask[b, i]}).fused
            torch.testing.assert_close(out[b : b + 1], alone, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(net(x, sample_present=torch.ones(3, 3, dtype=torch.bool)).fused, net(x).fused,
                                   atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="leaves a sample without any modality"):
        net(x, sample_present=torch.tensor([[True, True, True], [False, False, False], [True, False, False]]))


def test_joint_stem_feeds_the_fusion_stream_and_keeps_every_subset_working():
    """joint_stem adds one strided conv per raw modality to the first fusion level: it is trained, it changes the
    output, an absent modality's values still do not matter, and per-sample subsets still match separate runs."""
    names = ["t1", "t2", "pd"]
    assert small(names).stem is None
    net = small(names, joint_stem=True, dropout=0.0).eval()
    assert list(net.stem) == names and net.stem["t1"].weight.shape == (8, 1, 3, 3, 3)
    x = torch.randn(2, 3, SIZE, SIZE, SIZE)
    out = net(x)
    assert tuple(out.fused.shape) == (2, 4, SIZE, SIZE, SIZE) and sorted(out.per_modality) == sorted(names)
    y = x.clone()
    y[:, 2] = 1e3  # with the stem live: an absent modality's values still do not reach the output
    torch.testing.assert_close(net(x, present=[True, True, False]).fused, net(y, present=[True, True, False]).fused)
    with torch.no_grad():
        for conv in net.stem.values():
            conv.weight.zero_()
        without = net(x).fused
    assert not torch.allclose(out.fused, without)
    net = small(names, joint_stem=True, dropout=0.0).eval()
    mask = torch.tensor([[True, False, True], [False, True, False]])
    with torch.no_grad():
        both = net(x, sample_present=mask).fused
        for b in range(2):
            alone = net({m: x[b : b + 1, i : i + 1] for i, m in enumerate(names) if mask[b, i]}).fused
            torch.testing.assert_close(both[b : b + 1], alone, atol=1e-5, rtol=1e-4)
    net.train()(x).fused.mean().backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in net.stem.values())


def test_head_levels_give_each_modality_head_its_deeper_encoder_levels():
    """head_levels=2: a modality's head reads its first two encoder levels (the second upsampled): the heads keep
    the output shape, depend on the second level (zeroing it changes them; with one level it cannot) and train
    every parameter; out-of-range values are refused by name."""
    names = ["ct", "pet", "mr"]
    x = torch.randn(1, 3, SIZE, SIZE, SIZE)
    net = small(names, head_levels=2, dropout=0.0).train()
    out = net(x)
    assert {m: tuple(v.shape) for m, v in out.per_modality.items()} == {m: (1, 4, SIZE, SIZE, SIZE) for m in names}
    sum(v.mean() for v in out.per_modality.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.aux.parameters())
    net.eval()
    feats = net.encoders["mr"](x[:, 2:3])
    head = net.aux["mr"]
    zeroed = [feats[0], torch.zeros_like(feats[1]), *feats[2:]]
    with torch.no_grad():
        assert not torch.allclose(head(net._head_input(feats)), head(net._head_input(zeroed)))
    assert small(names)._head_input(zeroed) is feats[0]  # the default head reads the first level only
    with pytest.raises(ValueError, match="head_levels 5 must be in 1..3"):
        small(names, head_levels=5)
    assert build_network(load_config("phantom", overrides={"model": {"head_levels": 2}})).head_levels == 2


def _saved_bytes(fn) -> tuple[object, int]:
    """``fn()`` and the bytes of the tensors autograd keeps for its backward pass."""
    saved: dict[tuple[int, tuple[int, ...]], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[(t.data_ptr(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved.values())


def test_recomputed_training_step_gives_the_same_loss_and_gradients_with_less_kept():
    """Activation checkpointing of the network's blocks and of the hybrid loss's terms: bit-identical loss and
    gradients (dropout and per-sample modality subsets included), a fraction of the activations kept."""
    from crossmodal.hybrid import HybridLoss, hybrid_batch, sample_present
    from crossmodal.losses import SupervisedLoss

    cfg = load_config("brain")
    t = cfg.train
    gen = torch.Generator().manual_seed(3)
    labelled = [(torch.randn(2, 3, 32, 32, 32, generator=gen), torch.randint(-1, 4, (2, 1, 32, 32, 32), generator=gen))]
    x, y, n_lab, n_plain, aug = hybrid_batch(labelled, [torch.randn(2, 3, 32, 32, 32, generator=gen)],
                                             torch.Generator().manual_seed(4), modality_dropout=0.5)
    assert x.shape[0] == 6 and aug is not None and aug.present is not None
    results = []
    for on in (False, True):
        torch.manual_seed(5)  # the weights, and the decoder's dropout masks
        net = CrossModalNet(cfg.modality_names, 4, channels=(8, 16, 32), strides=(2, 2), dropout=0.2,
                            joint_stem=True, checkpointing=on).train()
        loss_fn = HybridLoss(SupervisedLoss(t.dice_weight, t.ce_weight, t.aux_weight, checkpointing=on),
                             t.consistency)
        assert loss_fn.checkpointing is on

        def forward_and_loss(net: CrossModalNet = net, loss_fn: HybridLoss = loss_fn) -> torch.Tensor:
            out = net(x, sample_present=sample_present(n_plain, aug))
            return loss_fn(out, y, n_lab, n_plain, aug, step=1000)[0]

        loss, kept = _saved_bytes(forward_and_loss)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}, kept))
    (loss_a, grads_a, kept_a), (loss_b, grads_b, kept_b) = results
    assert torch.equal(loss_a, loss_b) and float(loss_a) > 0
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    assert sum(float(g.abs().sum()) for g in grads_a.values()) > 0
    assert kept_b < 0.5 * kept_a, (kept_a, kept_b)
