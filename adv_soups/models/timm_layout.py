"""A single-domain ViT in timm's layout: state-dict names, PyTorch layouts, the Hub config.

`state_dict(arrays)` turns the google-research/vision_transformer `.npz` arrays that
`npz.export_arrays` gives (HWIO / [in, out] kernels, per-head attention kernels) into timm's
`VisionTransformer` names and layouts (numpy only, no torch):

  cls_token [1, 1, D]            pos_embed [1, 1 + N, D]
  patch_embed.proj.weight        [D, C, p, p] (OIHW)      .bias [D]
  blocks.i.norm1.{weight,bias}   blocks.i.attn.qkv.weight [3D, D] (q, k, v stacked)  .bias [3D]
  blocks.i.attn.proj.{weight [D, D], bias}                blocks.i.norm2.{weight,bias}
  blocks.i.mlp.fc1.{weight [M, D], bias}   blocks.i.mlp.fc2.{weight [D, M], bias}
  norm.{weight,bias}             head.{weight [K, D], bias [K]}

(a Linear's weight is [out, in]: the transposed Flax kernel). `hub_config(meta)` is the
`config.json` that timm's Hub loader reads (`timm.create_model("local-dir:DIR", pretrained=True)`
or `hf-hub:...`): the architecture, `model_args` that rebuild this exact ViT, and `pretrained_cfg`
with the input size and the normalisation our model applies inside.
"""
from __future__ import annotations

from typing import Any

import numpy as np

_BLOCK = "Transformer/encoderblock_{i}/"


def depth_of(arrays: dict[str, np.ndarray]) -> int:
  """Number of encoder blocks in vision_transformer-layout `arrays`."""
  i = 0
  while f"{_BLOCK.format(i=i)}LayerNorm_0/scale" in arrays:
    i += 1
  return i


def state_dict(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """vision_transformer `.npz` arrays -> timm `VisionTransformer` state dict (float32, C-order)."""
  a = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
  width = a["cls"].shape[-1]
  out = {
      "cls_token": a["cls"].reshape(1, 1, width),
      "pos_embed": a["Transformer/posembed_input/pos_embedding"],
      "patch_embed.proj.weight": a["embedding/kernel"].transpose(3, 2, 0, 1),  # HWIO -> OIHW
      "patch_embed.proj.bias": a["embedding/bias"],
      "norm.weight": a["Transformer/encoder_norm/scale"],
      "norm.bias": a["Transformer/encoder_norm/bias"],
      "head.weight": a["head/kernel"].T,
      "head.bias": a["head/bias"],
  }
  for i in range(depth_of(a)):
    src, dst = _BLOCK.format(i=i), f"blocks.{i}."
    attn = src + "MultiHeadDotProductAttention_1/"
    out[dst + "norm1.weight"] = a[src + "LayerNorm_0/scale"]
    out[dst + "norm1.bias"] = a[src + "LayerNorm_0/bias"]
    # query/key/value kernels are [D, heads, head_dim]: as a Linear, [heads * head_dim, D]
    out[dst + "attn.qkv.weight"] = np.concatenate(
        [a[f"{attn}{n}/kernel"].reshape(width, -1).T for n in ("query", "key", "value")])
    out[dst + "attn.qkv.bias"] = np.concatenate(
        [a[f"{attn}{n}/bias"].reshape(-1) for n in ("query", "key", "value")])
    out[dst + "attn.proj.weight"] = a[attn + "out/kernel"].reshape(-1, width).T
    out[dst + "attn.proj.bias"] = a[attn + "out/bias"]
    out[dst + "norm2.weight"] = a[src + "LayerNorm_2/scale"]
    out[dst + "norm2.bias"] = a[src + "LayerNorm_2/bias"]
    for j in (0, 1):
      out[dst + f"mlp.fc{j + 1}.weight"] = a[f"{src}MlpBlock_3/Dense_{j}/kernel"].T
      out[dst + f"mlp.fc{j + 1}.bias"] = a[f"{src}MlpBlock_3/Dense_{j}/bias"]
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hub_config(meta: dict[str, Any]) -> dict[str, Any]:
  """timm's Hub `config.json` for the export whose sidecar is `meta` (`export.sidecar`)."""
  size, channels = int(meta["image_size"]), int(meta["channels"])
  return {
      "architecture": "vit_base_patch16_224",  # timm's VisionTransformer; model_args set the size
      "num_classes": int(meta["num_classes"]),
      "num_features": int(meta["width"]),
      "global_pool": "token",
      "model_args": {
          "img_size": size, "patch_size": int(meta["patch_size"]), "in_chans": channels,
          "embed_dim": int(meta["width"]), "depth": int(meta["depth"]),
          "num_heads": int(meta["num_heads"]),
          "mlp_ratio": float(meta["mlp_dim"]) / float(meta["width"]),
          "qkv_bias": True, "class_token": True, "global_pool": "token",
      },
      "pretrained_cfg": {
          "input_size": [channels, size, size],
          "mean": list(meta["mean"]), "std": list(meta["std"]),
          "interpolation": "bicubic", "crop_pct": 1.0,
          "num_classes": int(meta["num_classes"]),
          "first_conv": "patch_embed.proj", "classifier": "head",
      },
  }
