"""Attack overhead: PGD-k (and APGD-k) vs k bare input-gradient passes of the same model.

  .venv/bin/python -m bench.bench_attacks [--batch 32] [--steps 10] [--repeats 5]

The model is a small ViT-like transformer written here in plain JAX (patch 4 on 32x32x3, width
192, depth 4, 3 heads, MLP 768, `jax.nn.dot_product_attention`, mean-pooled head, 10 classes).
The baseline is k input-gradient passes jitted as one `lax.fori_loop` (x += 1e-3 * grad, so no pass
can be skipped); PGD-k adds the projection, the sign and the random start. Both are timed in the
same run, alternating, best of `repeats`; the target is PGD-k / baseline <= 1.1.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from adv_soups.attacks import losses
from adv_soups.attacks.apgd import apgd
from adv_soups.attacks.pgd import pgd


def init_vit(key, *, image=32, patch=4, width=192, depth=4, heads=3, mlp=768, classes=10):
  """Parameters of the bench transformer (a pytree of float32 arrays)."""
  n_tok = (image // patch) ** 2
  keys = iter(jax.random.split(key, 4 + 4 * depth))
  dense = lambda k, a, b: jax.random.normal(k, (a, b)) / np.sqrt(a)
  params = dict(embed=dense(next(keys), patch * patch * 3, width),
                pos=0.02 * jax.random.normal(next(keys), (n_tok, width)),
                head=dense(next(keys), width, classes), blocks=[])
  for _ in range(depth):
    params["blocks"].append(dict(
        ln1=jnp.ones(width), ln2=jnp.ones(width),
        qkv=dense(next(keys), width, 3 * width), out=dense(next(keys), width, width),
        fc1=dense(next(keys), width, mlp), fc2=dense(next(keys), mlp, width)))
  params["cfg"] = (patch, heads)
  return params


def _ln(x, scale):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * scale


def vit_logits(params, images):
  """images [B, 32, 32, 3] in [0, 1] -> logits [B, classes]."""
  patch, heads = params["cfg"]
  b, h, w, c = images.shape
  x = (images - 0.5) / 0.25
  x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, -1, patch * patch * c) @ params["embed"] + params["pos"]
  width = x.shape[-1]
  for blk in params["blocks"]:
    q, k, v = jnp.split(_ln(x, blk["ln1"]) @ blk["qkv"], 3, axis=-1)
    split = lambda t: t.reshape(b, -1, heads, width // heads)
    att = jax.nn.dot_product_attention(split(q), split(k), split(v), implementation="xla")
    x = x + att.reshape(b, -1, width) @ blk["out"]
    x = x + jax.nn.gelu(_ln(x, blk["ln2"]) @ blk["fc1"]) @ blk["fc2"]
  return x.mean(1) @ params["head"]


def _time(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm up
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  k = args.steps
  params = init_vit(jax.random.PRNGKey(0))
  cfg = params.pop("cfg")
  model = lambda x: vit_logits(dict(params, cfg=cfg), x)
  x = jax.random.uniform(jax.random.PRNGKey(1), (args.batch, 32, 32, 3))
  y = jax.random.randint(jax.random.PRNGKey(2), (args.batch,), 0, 10)
  key = jax.random.PRNGKey(3)
  eps = 8 / 255

  @jax.jit
  def grad_loop(x, y):
    def body(_, xa):
      return xa + 1e-3 * jax.grad(lambda z: losses.ce_loss(model(z), y).sum())(xa)
    return jax.lax.fori_loop(0, k, body, x)
  pgd_k = jax.jit(lambda x, y: pgd(model, x, y, key, eps=eps, num_steps=k))
  apgd_k = jax.jit(lambda x, y: apgd(model, x, y, key, eps=eps, num_steps=k))

  times = {}
  for name, fn in (("grad", grad_loop), ("pgd", pgd_k), ("apgd", apgd_k)):
    times[name] = _time(fn, x, y, repeats=args.repeats)
  # A second round, alternating, to damp drift on a noisy machine.
  for name, fn in (("grad", grad_loop), ("pgd", pgd_k), ("apgd", apgd_k)):
    times[name] = min(times[name], _time(fn, x, y, repeats=args.repeats))
  print(f"devices: {jax.devices()}  batch {args.batch}, k = {k}, bench ViT (width 192, depth 4)")
  print(f"{k} input-gradient passes : {times['grad'] * 1e3:8.1f} ms")
  print(f"PGD-{k}                   : {times['pgd'] * 1e3:8.1f} ms   ratio "
        f"{times['pgd'] / times['grad']:.3f}  (target <= 1.1)")
  print(f"APGD-{k} (k+1 gradients)  : {times['apgd'] * 1e3:8.1f} ms   ratio "
        f"{times['apgd'] / times['grad']:.3f}  (k+1 passes: {(k + 1) / k:.3f} expected)")


if __name__ == "__main__":
  main()
