import math

import pytest
import torch

from model.losses import opqn_loss
from model.opqn import OPQN, VARIANTS, config_for_variant


def hand_loss(xs, s, logits, W, labels, r, u, lam):
    """Eq. 6-10 with Python loops: subspace CosFace on x and s, shared W_m, entropy."""
    B, M, _ = xs.shape
    classes = W.shape[2]

    def unit(v):
        n = math.sqrt(sum(float(a) ** 2 for a in v))
        return [float(a) / n for a in v]

    def ce(vectors):
        total = 0.0
        for m in range(M):
            for b in range(B):
                v = unit(vectors[b, m])
                z = []
                for c in range(classes):
                    cos = sum(a * w for a, w in zip(v, unit(W[m, :, c])))
                    z.append(r * (cos - (u if c == labels[b] else 0.0)))
                total += -z[labels[b]] + math.log(sum(math.exp(t) for t in z))
        return total / (B * M)

    ent = 0.0
    for b in range(B):
        for m in range(M):
            e = [math.exp(float(t)) for t in logits[b, m]]
            p = [t / sum(e) for t in e]
            ent += -sum(q * math.log(q) for q in p)
    ent /= B * M
    return 0.5 * (ce(xs) + ce(s)) + lam * ent


def test_loss_equals_hand_computation():
    gen = torch.Generator().manual_seed(0)
    cfg = config_for_variant("opqn", num_classes=3, M=2, K=2, D=4, image_size=32, width=0.25)
    xs = torch.randn(2, 2, 2, generator=gen, dtype=torch.float64)
    logits = torch.randn(2, 2, 2, generator=gen, dtype=torch.float64)
    C = torch.randn(2, 2, 2, generator=gen, dtype=torch.float64)
    s = torch.einsum("mdk,bmk->bmd", C, logits.softmax(-1))
    W = torch.randn(2, 2, 3, generator=gen, dtype=torch.float64)
    labels = torch.tensor([2, 0])
    parts = opqn_loss({"xs": xs, "s": s, "logits": logits}, labels, W, cfg)
    expected = hand_loss(xs, s, logits, W, labels.tolist(), cfg.r, cfg.u, cfg.lam)
    assert parts["loss"].item() == pytest.approx(expected, rel=1e-9)


def tiny_model(variant, **kw):
    cfg = config_for_variant(variant, num_classes=5, M=2, K=16, D=64, image_size=32, width=0.125, **kw)
    return OPQN(cfg)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradients_reach_backbone_F_W_and_C_only_for_l2q(variant):
    torch.manual_seed(0)
    model = tiny_model(variant)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0])
    parts = opqn_loss(model(images), labels, model.W, model.cfg)
    parts["loss"].backward()
    assert model.backbone.body[0].weight.grad.abs().sum() > 0
    assert model.backbone.head[3].weight.grad.abs().sum() > 0
    assert model.F.grad.abs().sum() > 0
    assert model.W.grad.abs().sum() > 0
    named = dict(model.named_parameters())
    if variant == "l2q":
        assert named["C"].grad.abs().sum() > 0
    else:
        assert "C" not in named and model.C.grad is None


def test_variant_switches():
    assert tiny_model("W").cfg.lam == 0.0
    assert tiny_model("W", lam=0.1).cfg.lam == 0.0, "a recipe's default lambda must not undo OPQN-W"
    assert tiny_model("C").W.shape == (1, 64, 5)
    assert tiny_model("opqn").W.shape == (2, 32, 5)
    with pytest.raises(ValueError, match="unknown OPQN variant"):
        config_for_variant("Z", num_classes=5)


def test_codes_and_tables():
    torch.manual_seed(0)
    model = tiny_model("opqn").eval()
    x = model.features(torch.randn(4, 3, 32, 32))
    codes = model.codes_from_features(x)
    assert codes.dtype == torch.uint8 and codes.shape == (4, 2)
    tables = model.tables_from_features(x)
    assert tables.shape == (4, 2, 16)
    torch.testing.assert_close(tables.sum(-1), torch.ones(4, 2))
    # normalising the sub-vectors rescales the logits: the argmax (the code) is unchanged
    assert torch.equal(tables.argmax(-1), codes.long())
    assert torch.equal(model.tables_from_features(x, normalize=False).argmax(-1), codes.long())
    big = OPQN(config_for_variant("opqn", num_classes=5, M=2, K=512, image_size=32, width=0.125)).eval()
    assert big.codes_from_features(big.features(torch.randn(3, 3, 32, 32))).dtype == torch.uint16


@pytest.mark.parametrize("size,width,out_map", [(32, 1.0, (512, 4, 4)), (112, 1.0, (512, 7, 7)), (32, 0.25, (128, 4, 4))])
def test_backbone_shapes_full_paper_config(size, width, out_map):
    model = OPQN(config_for_variant("opqn", num_classes=10, M=4, K=256, D=1024,
                                    image_size=size, width=width)).eval()
    assert model.backbone.out_map == out_map
    assert model.backbone.body[0].out_channels == out_map[0] // 8
    with torch.no_grad():
        assert model.features(torch.randn(2, 3, size, size)).shape == (2, 1024)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="K <= D/M"):
        config_for_variant("opqn", num_classes=5, M=4, K=256, D=512)
    with pytest.raises(ValueError, match="num_classes"):
        config_for_variant("opqn", num_classes=1)
