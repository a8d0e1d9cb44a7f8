"""DOEI (DESIGN §5.3): hand-computed HFA / φ_γ values, a dense per-head restatement of a DOEI
block, exact reduction to the baseline MCTformer, CAMs from the re-weighted class→patch block,
gradients, checkpoint compatibility and argument checks."""

import math

import numpy as np
import pytest
import torch

import wsss_fast  # noqa: F401
from tests.helpers import assert_rel_close
from wsss_fast.models.doei import (DOEI, cosine_affinity, decouple, hybrid_attention,
                                 progressive_gammas, rgb_similarity, scale_cross_logits)
from wsss_fast.engine import CamEngine
from wsss_fast.models.mctformer import MCTformer
from wsss_fast.models.registry import create_model, save_model


def tiny_mctformer(gen, version="v2", classes=3, depth=4):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = MCTformer(version, num_classes=classes, img_size=64, patch_size=16, embed_dim=32,
                      depth=depth, num_heads=2).eval()
    with torch.no_grad():   # peaky attention, so that every DOEI term matters
        for block in model.blocks:
            block.attn.qkv.weight.mul_(8)
    return model


# ------------------------------------------------------------------------ hand-computed pieces

def test_hybrid_attention_and_cpdo_hand_computed():
    # One class token, two patches. Tokens u: the class token and patch 1 point the same way,
    # patch 2 is orthogonal -> relu(cos) rows [1,1,0],[1,1,0],[0,0,1], row-normalized halves.
    attn_mean = torch.tensor([[[0.2, 0.3, 0.5], [0.1, 0.6, 0.3], [0.4, 0.4, 0.2]]])
    tokens = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]])
    # Two patches: their centred colours are opposite -> cos -1 -> relu 0: S_rgb = identity.
    image = torch.zeros(1, 3, 16, 32)
    image[..., 16:] = 1.0
    rgb = rgb_similarity(image, 16, 1)
    assert torch.equal(rgb, torch.eye(3)[None])
    hybrid = hybrid_attention(attn_mean, tokens, rgb, 0.5, 0.5)
    expected = torch.tensor([[[0.475, 0.275, 0.25], [0.175, 0.675, 0.15], [0.2, 0.2, 0.6]]])
    assert_rel_close(hybrid, expected, 1e-6, what="R_hyb")
    # CPDO, γ = 2, on the class row's patch part (0.275, 0.25): mass 0.525 kept,
    # shares 0.275² : 0.25² = 0.075625 : 0.0625.
    out = decouple(hybrid, 1, 2.0)
    cpdo = [0.525 * 0.075625 / 0.138125, 0.525 * 0.0625 / 0.138125]
    assert_rel_close(out[0, 0, 1:], torch.tensor(cpdo), 1e-6, what="CPDO")
    # One class: PPDO rows have one entry each, which φ keeps; the rest is untouched.
    assert torch.equal(out[0, 1:, :], hybrid[0, 1:, :])
    assert out[0, 0, 0] == hybrid[0, 0, 0]


def test_decouple_matches_rowwise_restatement(gen):
    c, p = 3, 5
    hybrid = torch.rand(2, c + p, c + p, generator=gen)
    gamma = 1.7
    out = decouple(hybrid, c, gamma)
    expected = hybrid.clone().double()
    for b in range(2):
        for row, cols in [(i, slice(c, None)) for i in range(c)] + \
                         [(i, slice(0, c)) for i in range(c, c + p)]:
            a = hybrid[b, row, cols].double()
            expected[b, row, cols] = a.sum() * a**gamma / (a**gamma).sum()
    assert_rel_close(out, expected.float(), 1e-5, what="decouple")


def test_rgb_similarity_matches_numpy(gen):
    image = torch.rand(2, 3, 37, 50, generator=gen)   # trailing pixels are dropped
    c, patch = 2, 8
    out = rgb_similarity(image, patch, c)
    h0, w0 = 37 // patch, 50 // patch
    for b in range(2):
        pixels = image[b, :, :h0 * patch, :w0 * patch].numpy().astype(np.float64)
        means = pixels.reshape(3, h0, patch, w0, patch).mean(axis=(2, 4)).reshape(3, -1).T
        centred = means - means.mean(axis=0)
        unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
        sim = np.maximum(unit @ unit.T, 0)
        np.fill_diagonal(sim, 1)
        expected = np.zeros((c + h0 * w0,) * 2)
        expected[:c, :c] = np.eye(c)
        expected[c:, c:] = sim
        np.testing.assert_allclose(out[b].numpy(), expected, atol=1e-5)  # fp32 centring


def test_cosine_affinity_diagonal_is_one_for_zero_vectors():
    vectors = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [-1.0, -1.0]]])
    expected = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0, 1]]])
    assert torch.equal(cosine_affinity(vectors), expected)


def test_progressive_gammas():
    assert progressive_gammas(4, 2.0) == pytest.approx((1.0, 4 / 3, 5 / 3, 2.0))
    assert progressive_gammas(1, 3.0) == (3.0,)
    assert progressive_gammas(3, 2.5, "constant") == (2.5, 2.5, 2.5)


def test_constant_schedule_sets_gamma_max_in_every_doei_block(gen):
    doei = DOEI(tiny_mctformer(gen), blocks=3, gamma_max=2.5, gamma_schedule="constant")
    assert doei.gammas == {1: 2.5, 2: 2.5, 3: 2.5}
    assert DOEI(tiny_mctformer(gen), blocks=3, gamma_max=2.5).gammas == \
        pytest.approx({1: 1.0, 2: 1.75, 3: 2.5})


def test_logit_reweighting_hand_computed():
    # One class token, two patches, γ = 2: only the class→patch and patch→class logits double.
    logits = torch.tensor([[0.0, math.log(2), 0.0], [math.log(3), 0.0, 0.0], [0.0, 0.5, 0.0]])
    scaled = scale_cross_logits(logits[None, None], 1, 2.0)[0, 0]
    expected = torch.tensor([[0.0, 2 * math.log(2), 0.0], [2 * math.log(3), 0.0, 0.0],
                             [0.0, 0.5, 0.0]])
    assert_rel_close(scaled, expected, 1e-6, what="scaled logits")
    # Softmax rows: exp(0, 2 ln 2, 0) = (1, 4, 1) / 6 and exp(2 ln 3, 0, 0) = (9, 1, 1) / 11;
    # the class key's share of a patch row rises from 3/5 to 9/11 (mass moves, unlike φ_γ).
    attn = torch.softmax(scaled, -1)
    assert_rel_close(attn[0], torch.tensor([1 / 6, 4 / 6, 1 / 6]), 1e-6, what="class row")
    assert_rel_close(attn[1], torch.tensor([9 / 11, 1 / 11, 1 / 11]), 1e-6, what="patch row")


# ------------------------------------------------------------------------ whole-block restatement

def restated_doei_block(block, x, image, num_cls, patch, lambda_e, lambda_c, gamma, beta,
                        reweight="probabilities", detach=False):
    """The DESIGN §5.3 block written out densely, head by head, in float64 (``reweight``:
    γ on the cross logits of each head, φ_γ on the fused probabilities, or both; ``detach``:
    ``R`` carries no gradient)."""
    x = x.double()
    b, t, dim = x.shape
    heads = block.attn.num_heads
    d = dim // heads
    norm1 = torch.nn.functional.layer_norm(x, (dim,), block.norm1.weight.double(),
                                           block.norm1.bias.double(), block.norm1.eps)
    qkv = norm1 @ block.attn.qkv.weight.double().T + block.attn.qkv.bias.double()
    q, k, v = qkv[..., :dim], qkv[..., dim:2 * dim], qkv[..., 2 * dim:]
    c = num_cls
    attn = []
    for h in range(heads):
        logits = q[..., h * d:(h + 1) * d] @ k[..., h * d:(h + 1) * d].transpose(1, 2) * d ** -0.5
        if reweight in ("logits", "both"):
            logits = logits.clone()
            logits[:, :c, c:] *= gamma
            logits[:, c:, :c] *= gamma
        attn.append(torch.softmax(logits, dim=-1))
    mean = sum(attn) / heads
    unit = norm1 / norm1.norm(dim=-1, keepdim=True)
    emb = (unit @ unit.transpose(1, 2)).clamp_min(0)
    emb = emb / emb.sum(-1, keepdim=True)
    rgb = rgb_similarity(image, patch, num_cls).double()
    rgb = rgb / rgb.sum(-1, keepdim=True)
    r = (mean + lambda_e * emb + lambda_c * rgb) / (1 + lambda_e + lambda_c)
    phi_blocks = () if reweight == "logits" else (
        (slice(0, c), slice(c, None)), (slice(c, None), slice(0, c)))
    for rows, cols in phi_blocks:
        a = r[:, rows, cols]
        r = r.clone()       # out of place, for the gradient test
        r[:, rows, cols] = a.sum(-1, keepdim=True) * a**gamma / (a**gamma).sum(-1, keepdim=True)
    if detach:
        r = r.detach()
    w_o = block.attn.proj.weight.double()
    mhsa = torch.cat([attn[h] @ v[..., h * d:(h + 1) * d] for h in range(heads)], -1) @ w_o.T
    mhsa = mhsa + block.attn.proj.bias.double()
    extra = sum((r - attn[h]) @ v[..., h * d:(h + 1) * d] @ w_o[:, h * d:(h + 1) * d].T
                for h in range(heads))
    x = x + mhsa + beta * extra
    norm2 = torch.nn.functional.layer_norm(x, (dim,), block.norm2.weight.double(),
                                           block.norm2.bias.double(), block.norm2.eps)
    mlp = block.mlp
    hidden = torch.nn.functional.gelu(norm2 @ mlp.fc1.weight.double().T + mlp.fc1.bias.double())
    return x + hidden @ mlp.fc2.weight.double().T + mlp.fc2.bias.double(), r


@pytest.mark.parametrize("reweight", ["probabilities", "logits", "both"])
def test_doei_forward_matches_dense_restatement(gen, reweight):
    model = tiny_mctformer(gen, classes=3, depth=3)
    image = torch.randn(2, 3, 48, 80, generator=gen)
    params = dict(lambda_e=0.7, lambda_c=0.3, gamma_max=2.5, beta=0.6)
    doei = DOEI(model, blocks=[-2, -1], reweight=reweight, **params)
    cls_tokens, patches = doei.forward_features(image)
    with torch.no_grad():
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(image)], 1)
        tokens = (tokens + model.interpolate_pos_encoding(48, 80)).double()
        tokens = model.blocks[0](tokens.float(), 3).double()
        for block, gamma in zip(model.blocks[1:], (1.0, 2.5)):
            tokens, _ = restated_doei_block(block, tokens, image, 3, 16, params["lambda_e"],
                                            params["lambda_c"], gamma, params["beta"], reweight)
    assert_rel_close(torch.cat([cls_tokens, patches], 1), tokens.float(), 1e-4, what="tokens")


def test_doei_cams_use_reweighted_class_to_patch_block(gen):
    model = tiny_mctformer(gen, classes=2, depth=3)
    image = torch.randn(1, 3, 64, 48, generator=gen)
    doei = DOEI(model, blocks=1, lambda_e=0.5, lambda_c=0.5, gamma_max=3.0, beta=0.5)
    cams = doei.cam_maps(image, cls_layers=2, attention_type="mct", refine=False)
    # Block 1 is a plain block (its head-mean class→patch attention), block 2 the DOEI block
    # (R's re-weighted class→patch rows, γ = γ_max for a single block).
    with torch.no_grad():
        tokens = torch.cat([model.cls_token, model.patch_embed(image)], 1)
        tokens = tokens + model.interpolate_pos_encoding(64, 48)
        tokens = model.blocks[0](tokens, 2)
        block = model.blocks[1]
        qkv = block.attn.qkv(block.norm1(tokens)).reshape(1, -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
        plain = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) * 0.25, -1).mean(1)
        tokens = block(tokens, 2)
        _, r = restated_doei_block(model.blocks[2], tokens, image, 2, 16, 0.5, 0.5, 3.0, 0.5)
    expected = (plain[:, :2, 2:].double() + r[:, :2, 2:]).reshape(1, 2, 4, 3)
    assert_rel_close(cams, expected.float(), 1e-4, what="DOEI class attention")


# ------------------------------------------------------------------------ reduction to baseline

# The streaming refinement's online softmax amplifies fp32 rounding of its inputs (with these
# peaky attentions it differs from the dense path by ~5e-6 itself), hence its looser tolerance;
# so does MCTformer+'s sqrt fusion, whose slope near 0 amplifies the ~5e-7 relative rounding
# difference between the C++ face's exp and the eager softmax of the DOEI blocks (~7e-5 here).
@pytest.mark.parametrize("version,attention_type,affinity,rtol", [
    ("v2", "fused", "dense", 1e-5), ("v2", "mct", "streaming", 1e-4), ("v1", "mct", "dense", 1e-5),
    ("plus", "fused", "dense", 2e-4)])
def test_doei_reduces_to_baseline(gen, version, attention_type, affinity, rtol):
    model = tiny_mctformer(gen, version=version, classes=3)
    image = torch.randn(2, 3, 64, 64, generator=gen)
    neutral = DOEI(model, blocks=4, lambda_e=0.0, lambda_c=0.0, gamma_max=1.0, beta=0.0)
    kwargs = dict(cls_layers=3, attention_type=attention_type, affinity=affinity)
    baseline = model.cam_maps(image, **kwargs)
    assert_rel_close(neutral.cam_maps(image, **kwargs), baseline, rtol, what="neutral DOEI")
    with torch.no_grad():
        for ours, theirs in zip(_as_tuple(neutral(image)), _as_tuple(model(image))):
            assert_rel_close(ours, theirs, 1e-5, what="logits")
    active = DOEI(model, blocks=4)     # the defaults do change the maps
    assert (active.cam_maps(image, **kwargs) - baseline).abs().max() > 1e-3 * baseline.abs().max()


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def test_wrapper_leaves_model_unchanged(gen):
    model = tiny_mctformer(gen)
    image = torch.randn(1, 3, 64, 64, generator=gen)
    before = model.cam_maps(image)
    DOEI(model).cam_maps(image)
    assert "forward_features" not in vars(model)
    assert torch.equal(model.cam_maps(image), before)


# ------------------------------------------------------------------------ training, checkpoints

def test_gradients_flow_through_doei_blocks(gen):
    model = tiny_mctformer(gen, classes=3)
    doei = DOEI(model, blocks=2).train()
    image = torch.randn(2, 3, 64, 64, generator=gen)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    cls_logits, patch_logits = doei(image)
    loss = (torch.nn.functional.multilabel_soft_margin_loss(cls_logits, labels)
            + torch.nn.functional.multilabel_soft_margin_loss(patch_logits, labels))
    loss.backward()
    grads = {name: p.grad for name, p in doei.named_parameters()
             if not name.startswith("model.norm.")}   # MCTformer never applies its final norm
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["model.blocks.3.attn.qkv.weight"].abs().sum() > 0
    doei_grad = grads["model.blocks.2.attn.qkv.weight"].clone()
    model.zero_grad()
    cls_logits, patch_logits = model(image)
    (torch.nn.functional.multilabel_soft_margin_loss(cls_logits, labels)
     + torch.nn.functional.multilabel_soft_margin_loss(patch_logits, labels)).backward()
    assert not torch.allclose(doei_grad, model.blocks[2].attn.qkv.weight.grad)


@pytest.mark.parametrize("detach", [True, False])
def test_gradients_match_dense_restatement(gen, detach):
    # The default detaches R: the backward sees only A_h (weight 1 − β) and V. Without it the
    # gradient also flows through HFA and φ_γ. Either way the forward is the same.
    model = tiny_mctformer(gen, classes=2, depth=2).train()
    image = torch.randn(2, 3, 48, 64, generator=gen)
    weights = torch.randn(2, 2 + 12, 32, generator=gen, dtype=torch.float64)
    doei = DOEI(model, blocks=1, lambda_e=0.7, lambda_c=0.3, gamma_max=2.5, beta=0.6,
                detach_reweight=detach)
    tokens = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(image)], 1)
    tokens = model.blocks[0](tokens + model.interpolate_pos_encoding(48, 64), 2).detach()
    block = model.blocks[1]
    ours = doei._doei_block(block, tokens, rgb_similarity(image, 16, 2), 2.5, None, None)
    (ours.double() * weights).sum().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    model.zero_grad()
    theirs, _ = restated_doei_block(block, tokens, image, 2, 16, 0.7, 0.3, 2.5, 0.6,
                                    detach=detach)
    (theirs * weights).sum().backward()
    assert_rel_close(ours.double(), theirs.detach(), 1e-4, what="DOEI block output")
    for (name, p), ours_grad in zip(block.named_parameters(), grads):
        assert_rel_close(ours_grad, p.grad, 1e-3, what=f"gradient of {name}")
    model.zero_grad()
    restated_doei_block(block, tokens, image, 2, 16, 0.7, 0.3, 2.5, 0.6,
                        detach=not detach)[0].mul(weights).sum().backward()
    assert (block.attn.qkv.weight.grad - grads[2]).abs().max() > 1e-3 * grads[2].abs().max()


def test_state_dict_and_registry_are_mctformer_compatible(gen, tmp_path):
    model = tiny_mctformer(gen, classes=3)
    doei = DOEI(model)
    assert list(doei.state_dict()) == list(model.state_dict())
    path = tmp_path / "v2.pth"
    save_model(model, path)
    loaded = create_model("mctformer_v2_doei", checkpoint=path, num_heads=2, beta=0.25)
    assert isinstance(loaded, DOEI) and loaded.beta == 0.25
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    image = torch.randn(1, 3, 64, 64, generator=gen)
    expected = DOEI(model, beta=0.25).cam_maps(image)
    assert_rel_close(loaded.eval().cam_maps(image), expected, 1e-6, what="reloaded DOEI")


def test_cam_engine_runs_doei_preset(gen):
    model = tiny_mctformer(gen, classes=3)
    engine = CamEngine(DOEI(model), "mctformer_v2_doei")
    image = (torch.rand(70, 90, 3, generator=gen) * 255).to(torch.uint8).numpy()
    result = engine(image, [1, 0, 1])
    assert result.high_res.shape == (3, 70, 90)
    assert list(result.keys) == [0, 2]
    assert math.isclose(float(result.high_res[0].max()), 1.0, rel_tol=1e-5)


# ------------------------------------------------------------------------ argument checks

@pytest.mark.parametrize("kwargs,message", [
    (dict(blocks=[7]), "out of range"), (dict(blocks=0), ">= 1"),
    (dict(lambda_e=-0.1), "lambda_e"), (dict(gamma_max=0.0), "gamma_max"),
    (dict(beta=float("nan")), "beta"), (dict(reweight="logit"), "reweight must be one of"),
    (dict(gamma_schedule="cosine"), "gamma_schedule must be one of"),
    (dict(detach_reweight="yes"), "detach_reweight must be true or false")])
def test_bad_arguments(gen, kwargs, message):
    with pytest.raises(ValueError, match=message):
        DOEI(tiny_mctformer(gen), **kwargs)


def test_needs_an_mctformer():
    with pytest.raises(ValueError, match="MCTformer"):
        DOEI(torch.nn.Linear(2, 2))
