"""The official MCTformer-V1/V2/+ generator re-implemented eagerly, in upstream's order of operations:
attention materialized per block and stacked, head-mean, sliced; one pass per forward; numpy sum
of label-masked, flipped-back passes; per-class min-max. It is the equivalence-test oracle (same
weights as a ``wsss_fast.models.mctformer`` model) and the materializing baseline of the benchmarks.
Written from reference/vit_methods.md §1 and the upstream code's semantics, not copied."""

import math

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def block_forward(block, x):
    b, t, d = x.shape
    heads = block.attn.num_heads
    qkv = block.attn.qkv(block.norm1(x)).reshape(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * block.attn.scale
    attn = attn.softmax(dim=-1)
    x = x + block.attn.proj((attn @ v).transpose(1, 2).reshape(b, t, d))
    x = x + block.mlp(block.norm2(x))
    return x, attn


def plus_pos_embed(model, patch_tokens, w, h):
    """MCTformer+ (eval): note its 'unchanged' test sees patch tokens only, minus C."""
    c = model.num_classes
    n = model.pos_embed_pat.shape[1]
    npatch = patch_tokens.shape[1] - c
    if npatch == n and w == h:
        return model.pos_embed_pat
    dim = patch_tokens.shape[-1]
    w0, h0 = w // 16, h // 16
    patch = F.interpolate(
        model.pos_embed_pat.reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
    return patch.permute(0, 2, 3, 1).reshape(1, -1, dim)


def pos_embed(model, x_tokens, w, h):
    c = model.num_classes
    npatch = x_tokens.shape[1] - c
    n = model.pos_embed.shape[1] - c
    if npatch == n and w == h:
        return model.pos_embed
    dim = x_tokens.shape[-1]
    w0, h0 = w // 16 + 0.1, h // 16 + 0.1
    patch = F.interpolate(
        model.pos_embed[:, c:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
    return torch.cat((model.pos_embed[:, :c], patch.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


@torch.no_grad()
def forward_return_att(model, images, n_layers):
    """(cams or mtatt, patch_attn (L, B, P, P)) as the official forward(return_att=True)."""
    c = model.num_classes
    b, _, w, h = images.shape
    x = model.patch_embed.proj(images).flatten(2).transpose(1, 2)
    if model.version == "plus":
        x = x + plus_pos_embed(model, x, w, h)
        x = torch.cat((model.cls_token.expand(b, -1, -1) + model.pos_embed_cls, x), dim=1)
    else:
        x = torch.cat((model.cls_token.expand(b, -1, -1), x), dim=1)
        x = x + pos_embed(model, x, w, h)
    weights = []
    for block in model.blocks:
        x, attn = block_forward(block, x)
        weights.append(attn)
    attn = torch.stack(weights).mean(dim=2)
    if model.version == "plus":
        mtatt = attn[-n_layers:].mean(0)[:, :c, c:]
    else:
        mtatt = attn[-n_layers:].sum(0)[:, :c, c:]
    patch_attn = attn[:, :, c:, c:]
    if model.version == "v1":
        return mtatt, patch_attn
    w0, h0 = w // 16, h // 16
    x_patch = x[:, c:].reshape(b, w0, h0, -1).permute(0, 3, 1, 2).contiguous()
    feature = F.relu(model.head(x_patch))
    cams = mtatt.reshape(b, c, w0, h0) * feature
    return (torch.sqrt(cams) if model.version == "plus" else cams), patch_attn


def generate(model, image, label, scales, n_layers=3):
    """The official generate_attention_maps_ms for one image (batch 1, patch-attn-refine):
    ``({class: min-max map}, the merged sum before normalization (C, H, W))``."""
    c = model.num_classes
    w_img, h_img = image.size
    passes = []
    for s in scales:
        resized = image.resize((round(w_img * s), round(h_img * s)), resample=PIL.Image.BICUBIC)
        x = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255
        x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        passes += [x[None], torch.flip(x[None], [-1])]
    h_orig, w_orig = passes[0].shape[2:]
    cam_list = []
    for index, images in enumerate(passes):
        wf, hf = images.shape[2] // 16, images.shape[3] // 16
        cams, patch_attn = forward_return_att(model, images, n_layers)
        cams = cams.reshape(1, c, wf, hf)
        patch_attn = patch_attn.sum(0)
        cams = torch.matmul(patch_attn.unsqueeze(1), cams.view(1, c, -1, 1)).reshape(1, c, wf, hf)
        cams = F.interpolate(cams, size=(h_orig, w_orig), mode="bilinear", align_corners=False)[0]
        cams = cams.numpy() * np.asarray(label, dtype=np.float32).reshape(c, 1, 1)
        if index % 2 == 1:
            cams = np.flip(cams, axis=-1)
        cam_list.append(cams)
    total = np.sum(cam_list, axis=0)
    out = {}
    for k in np.nonzero(np.asarray(label))[0]:
        m = total[k]
        out[int(k)] = (m - m.min()) / (m.max() - m.min() + 1e-8)
    return out, total
