"""Run by the interop tests with the torch venv's Python (.venv-timm): never imported by pytest.

  python timm_logits.py CASE.npz

CASE.npz holds `images` (NHWC in [0, 1]), `npz` (the .npz export's path) and `timm_dir` (the
--format=timm export's directory). Loads the .npz with timm's own loader
(`VisionTransformer.load_pretrained`) and the directory with `timm.create_model("local-dir:...",
pretrained=True)`, normalises the images with each model's data config, and writes
CASE.out.npz with both logits, the load times (s) and the timm version.
"""
import json
import os
import sys
import time

import numpy as np
import timm
import torch
from timm.models import vision_transformer


def logits(model, images, mean, std):
  x = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  with torch.no_grad():
    return model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()


def main(path):
  case = np.load(path)
  images, npz_path, timm_dir = case["images"], str(case["npz"]), str(case["timm_dir"])
  with open(npz_path[:-len(".npz")] + ".json") as f:
    meta = json.load(f)
  t0 = time.perf_counter()
  vit = vision_transformer.VisionTransformer(
      img_size=meta["image_size"], patch_size=meta["patch_size"], in_chans=meta["channels"],
      num_classes=meta["num_classes"], embed_dim=meta["width"], depth=meta["depth"],
      num_heads=meta["num_heads"], mlp_ratio=meta["mlp_dim"] / meta["width"], qkv_bias=True,
      class_token=True, global_pool="token")
  vit.load_pretrained(npz_path)
  vit.eval()
  npz_load_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  model = timm.create_model(f"local-dir:{timm_dir}", pretrained=True)
  model.eval()
  timm_load_s = time.perf_counter() - t0
  cfg = timm.data.resolve_data_config({}, model=model)
  np.savez(path[:-len(".npz")] + ".out.npz",
           npz_logits=logits(vit, images, meta["mean"], meta["std"]),
           timm_logits=logits(model, images, cfg["mean"], cfg["std"]),
           input_size=np.asarray(cfg["input_size"]), npz_load_s=npz_load_s,
           timm_load_s=timm_load_s, timm_version=timm.__version__,
           torch_version=torch.__version__)


if __name__ == "__main__":
  main(sys.argv[1])
