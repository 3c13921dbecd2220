"""An independent, functional transcription of the original LSeg forward (LSegNet, DPT-ViT).

It reads the original `net.*` state dict directly, so it checks our key mapping *and* numerics
(bilinear position-embedding resize, hooks before the final norm, readout projection, fusion order,
align_corners, logit scale 1/0.07) without the original package (which needs torch 1.7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def original_vit_schema(
    dim: int,
    depth: int,
    patch: int,
    grid: int,
    channels: list[int],
    features: int,
    embed_dim: int,
    clip_state: dict[str, torch.Tensor],
    head_block: bool = False,
    use_bn: bool = True,
) -> dict[str, torch.Tensor]:
    """Random tensors in the original checkpoint's key schema (shapes as documented in the issue).

    `use_bn=False` is the layout of `ResidualConvUnit_custom(bn=False)`: biased convolutions, no BN.
    """
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=0.05):
        return torch.randn(shape, generator=g) * scale

    sd = {f"net.clip_pretrained.{k}": rand(*v.shape) for k, v in clip_state.items()}
    p = "net.pretrained.model."
    sd[p + "cls_token"] = rand(1, 1, dim)
    sd[p + "pos_embed"] = rand(1, grid * grid + 1, dim)
    sd[p + "patch_embed.proj.weight"] = rand(dim, 3, patch, patch)
    sd[p + "patch_embed.proj.bias"] = rand(dim)
    for i in range(depth):
        b = f"{p}blocks.{i}."
        for norm in ("norm1", "norm2"):
            sd[b + f"{norm}.weight"] = 1 + rand(dim)
            sd[b + f"{norm}.bias"] = rand(dim)
        sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = rand(3 * dim, dim), rand(3 * dim)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = rand(dim, dim), rand(dim)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = rand(4 * dim, dim), rand(4 * dim)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = rand(dim, 4 * dim), rand(dim)
    sd[p + "norm.weight"], sd[p + "norm.bias"] = 1 + rand(dim), rand(dim)
    sd[p + "head.weight"], sd[p + "head.bias"] = rand(1000, dim), rand(1000)
    resample = {1: (4, "t"), 2: (2, "t"), 4: (3, "c")}
    for i, c in enumerate(channels, 1):
        q = f"net.pretrained.act_postprocess{i}."
        sd[q + "0.project.0.weight"], sd[q + "0.project.0.bias"] = rand(dim, 2 * dim), rand(dim)
        sd[q + "3.weight"], sd[q + "3.bias"] = rand(c, dim, 1, 1, scale=0.2), rand(c)
        if i in resample:
            k, _ = resample[i]
            sd[q + "4.weight"], sd[q + "4.bias"] = rand(c, c, k, k, scale=0.2), rand(c)
    s = "net.scratch."
    for i, c in enumerate(channels, 1):
        sd[s + f"layer{i}_rn.weight"] = rand(features, c, 3, 3, scale=0.1)
    for i in range(1, 5):
        r = f"{s}refinenet{i}."
        sd[r + "out_conv.weight"], sd[r + "out_conv.bias"] = (
            rand(features, features, 1, 1, scale=0.2),
            rand(features),
        )
        for unit in ("resConfUnit1", "resConfUnit2"):
            for n in (1, 2):
                sd[f"{r}{unit}.conv{n}.weight"] = rand(features, features, 3, 3, scale=0.05)
                if not use_bn:
                    sd[f"{r}{unit}.conv{n}.bias"] = rand(features)
                    continue
                sd[f"{r}{unit}.bn{n}.weight"] = 1 + rand(features)
                sd[f"{r}{unit}.bn{n}.bias"] = rand(features)
                sd[f"{r}{unit}.bn{n}.running_mean"] = rand(features)
                sd[f"{r}{unit}.bn{n}.running_var"] = 1 + rand(features).abs()
                sd[f"{r}{unit}.bn{n}.num_batches_tracked"] = torch.tensor(100)
    sd[s + "head1.weight"], sd[s + "head1.bias"] = rand(embed_dim, features, 1, 1, scale=0.2), rand(embed_dim)
    if head_block:
        sd[s + "head_block.depthwise.depthwise.weight"] = rand(1, 1, 3, 3, scale=0.3)
        sd[s + "head_block.depthwise.depthwise.bias"] = rand(1)
    return sd


def _conv(x, sd, key, **kw):
    return F.conv2d(x, sd[key + ".weight"], sd.get(key + ".bias"), **kw)


def _batch_norm(x, sd, key):
    """`ResidualConvUnit_custom` applies its BN only when built with `bn=True` (then the keys exist)."""
    if key + ".weight" not in sd:
        return x
    return F.batch_norm(
        x,
        sd[key + ".running_mean"],
        sd[key + ".running_var"],
        sd[key + ".weight"],
        sd[key + ".bias"],
        training=False,
        eps=1e-5,
    )


def _rcu(x, sd, pre):
    out = F.relu(x)
    out = _batch_norm(_conv(out, sd, pre + "conv1", padding=1), sd, pre + "bn1")
    out = F.relu(out)
    out = _batch_norm(_conv(out, sd, pre + "conv2", padding=1), sd, pre + "bn2")
    return out + x


def _fusion(sd, i, x, skip=None):
    pre = f"net.scratch.refinenet{i}."
    if skip is not None:
        x = x + _rcu(skip, sd, pre + "resConfUnit1.")
    x = _rcu(x, sd, pre + "resConfUnit2.")
    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    return _conv(x, sd, pre + "out_conv")


@torch.no_grad()
def original_forward(sd, x, text, depth, heads, patch, arch_option=0, block_depth=0):
    """Original LSegNet.forward for a DPT-ViT checkpoint (eval mode, float32), given text features.

    `arch_option` 1 (bottleneck_block) or 2 (depthwise_block) adds `scratch.head_block`, applied as
    the original does: `block_depth - 1` times with LeakyReLU, then once without (so 0 and 1 are one pass).
    """
    p = "net.pretrained.model."
    batch, _, height, width = x.shape
    gh, gw = height // patch, width // patch
    tokens = F.conv2d(x, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2)
    pos = sd[p + "pos_embed"]
    dim = pos.shape[-1]
    old = int((pos.shape[1] - 1) ** 0.5)
    grid = pos[:, 1:].reshape(1, old, old, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bilinear")
    pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)], dim=1)
    h = torch.cat([sd[p + "cls_token"].expand(batch, -1, -1), tokens], dim=1) + pos
    hooks = [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]
    acts = []
    for i in range(depth):
        b = f"{p}blocks.{i}."
        y = F.layer_norm(h, (dim,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(batch, -1, dim)
        h = h + F.linear(y, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        y = F.layer_norm(h, (dim,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        y = F.linear(
            F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
            sd[b + "mlp.fc2.weight"],
            sd[b + "mlp.fc2.bias"],
        )
        h = h + y
        if i in hooks:
            acts.append(h)
    layers = []
    for j, a in enumerate(acts, 1):
        q = f"net.pretrained.act_postprocess{j}."
        readout = a[:, :1].expand_as(a[:, 1:])
        f = F.gelu(
            F.linear(
                torch.cat([a[:, 1:], readout], -1), sd[q + "0.project.0.weight"], sd[q + "0.project.0.bias"]
            )
        )
        f = f.transpose(1, 2).unflatten(2, (gh, gw))
        f = _conv(f, sd, q + "3")
        if j in (1, 2):
            f = F.conv_transpose2d(f, sd[q + "4.weight"], sd[q + "4.bias"], stride=4 if j == 1 else 2)
        elif j == 4:
            f = _conv(f, sd, q + "4", stride=2, padding=1)
        layers.append(f)
    rn = [F.conv2d(f, sd[f"net.scratch.layer{i}_rn.weight"], padding=1) for i, f in enumerate(layers, 1)]
    path = _fusion(sd, 4, rn[3])
    path = _fusion(sd, 3, path, rn[2])
    path = _fusion(sd, 2, path, rn[1])
    path = _fusion(sd, 1, path, rn[0])
    feat = _conv(path, sd, "net.scratch.head1")
    shape = feat.shape
    pixels = feat.permute(0, 2, 3, 1).reshape(-1, shape[1])
    pixels = pixels / pixels.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    logits = (1 / 0.07) * pixels @ text.t()
    out = logits.view(shape[0], shape[2], shape[3], -1).permute(0, 3, 1, 2)

    def head_block(out, act=True):
        w, bias = (
            sd["net.scratch.head_block.depthwise.depthwise.weight"],
            sd["net.scratch.head_block.depthwise.depthwise.bias"],
        )
        summed = out.max(dim=1, keepdim=True)[0]
        out = torch.cat([F.conv2d(out[:, i : i + 1], w, bias, padding=1) for i in range(out.shape[1])], dim=1)
        if arch_option == 1:
            out = out + summed
        return F.leaky_relu(out) if act else out

    if arch_option in (1, 2):
        for _ in range(block_depth - 1):
            out = head_block(out)
        out = head_block(out, False)
    return F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)
