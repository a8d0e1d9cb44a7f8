"""The Conformer's mimetic attention initialization (Trockman & Kolter 2023): at init the logit
form W_qᵀ W_k of every head is close to a scaled identity, W_o W_v to −β₂·I, and a token's
attention peaks on itself and on the tokens identical to it; upstream's init does neither."""

import pytest
import torch

from wsss_fast.models.conformer import MIMETIC_VO, Conformer, mimetic_init_
from wsss_fast.models.registry import create_model
from wsss_fast.models.vit_blocks import Attention

DIM, HEADS = 64, 2


def _attention(init: str, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    attention = Attention(DIM, HEADS)
    if init == "mimetic":
        mimetic_init_(attention)
    else:                                   # upstream's: every Linear ~ N(0, 0.02²)
        for linear in (attention.qkv, attention.proj):
            torch.nn.init.trunc_normal_(linear.weight, std=0.02)
            torch.nn.init.zeros_(linear.bias)
    return attention


def _logit_forms(attention: Attention) -> list[torch.Tensor]:
    """Per head, the (dim, dim) bilinear form B with q·k = xᵀ B x'."""
    dim, heads = attention.proj.in_features, attention.num_heads
    head_dim = dim // heads
    weight = attention.qkv.weight.detach()
    return [weight[h * head_dim:(h + 1) * head_dim].t() @ weight[dim + h * head_dim:
                                                                   dim + (h + 1) * head_dim]
            for h in range(heads)]


def _attention_rows(attention: Attention, x: torch.Tensor) -> torch.Tensor:
    b, t, _ = x.shape
    qkv = attention.qkv(x).reshape(b, t, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    return (q @ k.transpose(-1, -2) * attention.scale).softmax(-1).mean(1)   # head mean


@pytest.mark.parametrize("seed", [0, 1])
def test_mimetic_logit_form_is_a_noisy_scaled_identity(seed):
    for form in _logit_forms(_attention("mimetic", seed)):
        diagonal = form.diagonal()
        off_diagonal = form - torch.diag(diagonal)
        assert diagonal.mean() > 0.3                                # ~ β₁ · head_dim / DIM
        assert off_diagonal.pow(2).mean().sqrt() < diagonal.mean() / 4
    for form in _logit_forms(_attention("trunc_normal", seed)):
        assert form.diagonal().mean().abs() < 0.01


def test_mimetic_value_path_is_minus_beta_identity():
    attention = _attention("mimetic")
    value_path = attention.proj.weight.detach() @ attention.qkv.weight.detach()[2 * DIM:]
    alpha, beta = MIMETIC_VO
    assert value_path.diagonal().mean() == pytest.approx(-beta, abs=0.05)
    noise = value_path + beta * torch.eye(DIM)
    assert noise.pow(2).mean().sqrt() == pytest.approx(alpha / DIM ** 0.5, rel=0.2)
    assert torch.count_nonzero(attention.qkv.bias) == 0
    assert torch.count_nonzero(attention.proj.bias) == 0


def test_mimetic_attention_peaks_on_itself_and_on_identical_tokens():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 33, DIM, generator=gen)
    x[:, 1:9] = x[:, :1]                    # tokens 0..8 are copies of one token
    rows = _attention_rows(_attention("mimetic"), x)
    distinct = rows[:, 9:, 9:]              # a distinct token's row, over the distinct tokens
    assert (distinct.argmax(-1) == torch.arange(24)).float().mean() > 0.95
    copies = rows[:, :9]                    # the copies' rows: their mass stays on the copies
    assert copies[..., :9].sum(-1).min() > 0.9
    on_copies = copies[..., :9]             # identical keys: equal shares
    torch.testing.assert_close(on_copies, on_copies.mean(-1, keepdim=True).expand_as(on_copies),
                               atol=1e-5, rtol=0)
    # upstream's init: near-uniform rows (33 tokens), no preference for itself
    rows = _attention_rows(_attention("trunc_normal"), x)
    assert rows.max() < 2.0 / 33


def test_conformer_attn_init_option():
    torch.manual_seed(0)
    kwargs = dict(base_channel=16, channel_ratio=1, embed_dim=DIM, depth=3, num_heads=HEADS,
                  num_classes=5)
    mimetic = Conformer(attn_init="mimetic", **kwargs)
    for block in mimetic.blocks():
        for form in _logit_forms(block.attn):
            assert form.diagonal().mean() > 0.3
    qk_only = Conformer(attn_init="mimetic_qk", **kwargs)
    for block in qk_only.blocks():          # W_q, W_k mimetic; W_v, W_o upstream's N(0, 0.02²)
        assert _logit_forms(block.attn)[0].diagonal().mean() > 0.3
        assert block.attn.proj.weight.std() < 0.03
    default = Conformer(**kwargs)
    for block in default.blocks():
        assert block.attn.qkv.weight.std() < 0.03
    with pytest.raises(ValueError, match="attn_init must be one of"):
        Conformer(attn_init="xavier", **kwargs)


def test_small_conformer_starts_mimetic_and_the_published_one_does_not():
    torch.manual_seed(0)
    tiny = create_model("transcam_tiny", num_classes=8)
    for block in tiny.blocks():
        assert min(float(form.diagonal().mean()) for form in _logit_forms(block.attn)) > 0.3
    published = Conformer(base_channel=16, channel_ratio=1, embed_dim=DIM, depth=3,
                          num_heads=HEADS)          # transcam_small's init, at a small size
    for block in published.blocks():
        assert max(abs(float(form.diagonal().mean())) for form in _logit_forms(block.attn)) < 0.01
