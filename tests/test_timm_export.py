"""`adv_soups.export --format=timm`: timm's names and layouts (checked here without torch, by a
numpy forward pass over the exported state dict), its Hub config and model card; and, in the
torch venv (.venv-timm, `ADV_SOUPS_TIMM_PYTHON`), timm itself loading both formats."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import special

from adv_soups import export, loading
from adv_soups.models import timm_layout
from conftest import tiny_digits_config, write_untrained_workdir

HERE = os.path.dirname(os.path.abspath(__file__))
TIMM_PYTHON = os.environ.get("ADV_SOUPS_TIMM_PYTHON")


@pytest.fixture(scope="module")
def soup_workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("timm_export")
  config = tiny_digits_config(root / "tfds")
  config.model.depth = 2
  write_untrained_workdir(root / "wd", config, noise=0.2)
  return str(root / "wd")


def images(n, seed=0):
  return np.random.RandomState(seed).rand(n, 8, 8, 1).astype(np.float32)


def expected_shapes(meta):
  """timm VisionTransformer's state dict for these sizes (written from timm's module tree)."""
  d, m, k, p, c = meta["width"], meta["mlp_dim"], meta["num_classes"], meta["patch_size"], \
      meta["channels"]
  n = (meta["image_size"] // p) ** 2
  shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + n, d),
            "patch_embed.proj.weight": (d, c, p, p), "patch_embed.proj.bias": (d,),
            "norm.weight": (d,), "norm.bias": (d,), "head.weight": (k, d), "head.bias": (k,)}
  for i in range(meta["depth"]):
    b = f"blocks.{i}."
    shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,),
                   b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
                   b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                   b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                   b + "mlp.fc1.weight": (m, d), b + "mlp.fc1.bias": (m,),
                   b + "mlp.fc2.weight": (d, m), b + "mlp.fc2.bias": (d,)})
  return shapes


def numpy_vit(sd, x, heads):
  """timm's VisionTransformer forward (token pooling, pre-norm, exact GELU, LayerNorm eps 1e-6)
  in numpy over state dict `sd`; x: normalised NCHW."""
  def ln(h, name):
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    return (h - mu) / np.sqrt(var + 1e-6) * sd[name + ".weight"] + sd[name + ".bias"]
  linear = lambda h, name: h @ sd[name + ".weight"].T + sd[name + ".bias"]
  w = sd["patch_embed.proj.weight"]
  d, c, p, _ = w.shape
  b, _, size, _ = x.shape
  g = size // p
  patches = x.reshape(b, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)
  h = patches @ w.reshape(d, -1).T + sd["patch_embed.proj.bias"]
  h = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, d)), h], 1) + sd["pos_embed"]
  i = 0
  while f"blocks.{i}.norm1.weight" in sd:
    pre = f"blocks.{i}."
    qkv = linear(ln(h, pre + "norm1"), pre + "attn.qkv").reshape(b, -1, 3, heads, d // heads)
    q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    h = h + linear((attn @ v).transpose(0, 2, 1, 3).reshape(b, -1, d), pre + "attn.proj")
    u = linear(ln(h, pre + "norm2"), pre + "mlp.fc1")
    h = h + linear(0.5 * u * (1 + special.erf(u / np.sqrt(2))), pre + "mlp.fc2")
    i += 1
  return linear(ln(h, "norm")[:, 0], "head")


def test_timm_export_has_timm_names_shapes_and_the_soups_logits(soup_workdir, tmp_path):
  from safetensors.numpy import load_file
  out = str(tmp_path / "soup")
  export.main(["export", f"--workdir={soup_workdir}", "--alpha=0.3", "--format=timm",
               f"--out={out}"])
  assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
  sd = load_file(os.path.join(out, "model.safetensors"))
  with open(os.path.join(out, "config.json")) as f:
    hub = json.load(f)
  run = loading.load(soup_workdir)
  meta = export.sidecar(run, 0.3)
  assert {k: v.shape for k, v in sd.items()} == expected_shapes(meta)
  assert all(v.dtype == np.float32 for v in sd.values())
  args = hub["model_args"]
  assert (args["img_size"], args["patch_size"], args["in_chans"], args["embed_dim"],
          args["depth"], args["num_heads"]) == (8, meta["patch_size"], 1, 32, 2, 2)
  assert args["mlp_ratio"] * args["embed_dim"] == meta["mlp_dim"]
  assert (args["qkv_bias"], args["class_token"], args["global_pool"]) == (True, True, "token")
  assert (hub["num_classes"], hub["num_features"]) == (10, 32)
  cfg = hub["pretrained_cfg"]
  assert (cfg["input_size"], cfg["mean"], cfg["std"], cfg["first_conv"], cfg["classifier"]) == (
      [1, 8, 8], [0.5], [0.5], "patch_embed.proj", "head")
  x = images(6)
  got = numpy_vit(sd, ((x - 0.5) / 0.5).transpose(0, 3, 1, 2), heads=args["num_heads"])
  np.testing.assert_allclose(got, np.asarray(run.predict(x, alpha=0.3)), atol=2e-4)
  card = open(os.path.join(out, "README.md")).read()
  assert "alpha = 0.3" in card and "linf eps = 0.03" in card and "No evaluation report" in card


def test_model_card_quotes_the_latest_matching_report(soup_workdir, tmp_path):
  import shutil
  wd = str(tmp_path / "wd")
  shutil.copytree(soup_workdir, wd)
  os.makedirs(os.path.join(wd, "sweep"))
  report = {"checkpoint_step": 1, "attack": {"description": "APGD-CE (100 steps)"}, "eps": 0.03,
            "norm": "linf", "dataset": "digits", "split": "test", "num_examples": 360,
            "results": [{"alpha": 0.0, "clean_accuracy": 0.9, "robust_accuracy": 0.1},
                        {"alpha": 0.3, "clean_accuracy": 0.875, "robust_accuracy": 0.5}]}
  with open(os.path.join(wd, "sweep", "a.json"), "w") as f:
    json.dump(report, f)
  meta = export.export_timm(wd, 0.3, str(tmp_path / "out"))
  card = open(meta["files"]["README.md"]).read()
  assert "| 87.50% | 50.00% | APGD-CE (100 steps) | linf eps = 0.03 |" in card
  assert meta["report"].endswith("a.json")


@pytest.mark.parametrize("args, expected", [
    (["--format=onnx", "--out={tmp}/d"], "--format='onnx'"),
    (["--format=timm", "--out={tmp}/soup.npz"], "writes a directory"),
    (["--format=timm", "--out={tmp}/no/such/d"], "does not exist"),
])
def test_timm_export_bad_input_exits_2_and_writes_nothing(args, expected, soup_workdir, tmp_path,
                                                          capsys):
  argv = ["export", f"--workdir={soup_workdir}", "--alpha=0.5"]
  argv += [a.format(tmp=tmp_path) for a in args]
  with pytest.raises(SystemExit) as info:
    export.main(argv)
  assert info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and expected in err[0]
  assert os.listdir(tmp_path) == []


@pytest.mark.interop
@pytest.mark.skipif(not TIMM_PYTHON, reason="ADV_SOUPS_TIMM_PYTHON (a Python with torch and "
                    "timm, e.g. .venv-timm/bin/python: `make timm-venv`) is not set; .ci/run "
                    "sets it")
def test_timm_loads_both_exports_with_the_soups_logits(soup_workdir, tmp_path):
  npz_path, timm_dir = str(tmp_path / "soup.npz"), str(tmp_path / "soup_timm")
  export.export_soup(soup_workdir, 0.3, npz_path)
  export.export_timm(soup_workdir, 0.3, timm_dir)
  x = images(8, seed=1)
  case = str(tmp_path / "case.npz")
  np.savez(case, images=x, npz=npz_path, timm_dir=timm_dir)
  result = subprocess.run([TIMM_PYTHON, os.path.join(HERE, "interop", "timm_logits.py"), case],
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = np.load(str(tmp_path / "case.out.npz"))
  want = np.asarray(loading.load(soup_workdir).predict(x, alpha=0.3))
  np.testing.assert_allclose(out["npz_logits"], want, atol=1e-4)
  np.testing.assert_allclose(out["timm_logits"], want, atol=1e-4)
  assert list(out["input_size"]) == [1, 8, 8]
  print(f"timm {out['timm_version']} / torch {out['torch_version']}: load .npz "
        f"{float(out['npz_load_s']):.2f} s, local-dir safetensors {float(out['timm_load_s']):.2f} s")
