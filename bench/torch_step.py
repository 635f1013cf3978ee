"""The PyTorch eager baseline of `bench.train_step`: the same ViT and the same train steps, written
as a PyTorch user would. Never imported by the package: `bench.train_step --baseline=torch` runs
it as a subprocess from its own venv (`make bench-torch-venv` builds `.venv-torch`).

  .venv-torch/bin/python bench/torch_step.py --mode=cotrain --steps=3     # one JSON line
  .venv-torch/bin/python bench/torch_step.py --serve ...                  # the interleaving worker

The model: conv patch embedding, one class token per domain (the token adapter) with a position
embedding, pre-norm blocks of `nn.LayerNorm`, `nn.MultiheadAttention` and an `nn.GELU` MLP, a final
LayerNorm and a linear head; inputs in [0, 1] normalised inside ((x - 0.5) / 0.5). The step:
PGD-k l_inf with a uniform random start, `torch.autograd.grad` w.r.t. the input with the
parameters' grads off; cotrain = CE(f(x, clean)) + CE(f(x_adv, adversarial)) on one concatenated
batch, adversarial = CE(f(x_adv)), clean = CE(f(x)); global-norm clipping at 1 and
`torch.optim.AdamW` with decay on the weight matrices only. PyTorch's default threads.

`--serve` prints `ready` and then, for each stdin line `MODE STEPS`, runs STEPS steps of MODE and
prints one JSON line {"mode", "steps", "seconds"}; a line `quit` (or end of input) ends it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
  def __init__(self, width: int, heads: int, mlp: int):
    super().__init__()
    self.norm1 = nn.LayerNorm(width, eps=1e-6)
    self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
    self.norm2 = nn.LayerNorm(width, eps=1e-6)
    self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(), nn.Linear(mlp, width))

  def forward(self, x):
    y = self.norm1(x)
    x = x + self.attn(y, y, y, need_weights=False)[0]
    return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
  """images float32 [B, C, H, W] in [0, 1], domain int64 [B] -> logits [B, classes]."""

  def __init__(self, *, image_size, patch_size, channels, width, depth, heads, mlp, classes,
               domains):
    super().__init__()
    self.embed = nn.Conv2d(channels, width, patch_size, stride=patch_size)
    tokens = (image_size // patch_size) ** 2 + 1
    self.cls = nn.Parameter(torch.zeros(domains, 1, width))
    self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, width))
    self.blocks = nn.ModuleList(Block(width, heads, mlp) for _ in range(depth))
    self.norm = nn.LayerNorm(width, eps=1e-6)
    self.head = nn.Linear(width, classes)

  def forward(self, images, domain):
    x = self.embed((images - 0.5) / 0.5).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls[domain], x], dim=1) + self.pos
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x)[:, 0])


def pgd(model, images, labels, domain, eps, steps, step_size):
  """PGD-k l_inf from a uniform random start; only the input is differentiated."""
  for p in model.parameters():
    p.requires_grad_(False)
  x_adv = (images + torch.empty_like(images).uniform_(-eps, eps)).clamp(0, 1)
  for _ in range(steps):
    x_adv.requires_grad_(True)
    loss = F.cross_entropy(model(x_adv, domain), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x_adv)
    x_adv = x_adv.detach() + step_size * grad.sign()
    x_adv = torch.min(torch.max(x_adv, images - eps), images + eps).clamp(0, 1)
  for p in model.parameters():
    p.requires_grad_(True)
  return x_adv.detach()


class Trainer:
  """One model and optimizer per mode; `step()` runs one train step on a fixed random batch."""

  def __init__(self, mode, args):
    self.mode, self.args = mode, args
    torch.manual_seed(0)
    self.model = ViT(image_size=args.image_size, patch_size=args.patch, channels=3,
                     width=args.width, depth=args.depth, heads=args.heads, mlp=args.mlp,
                     classes=args.num_classes, domains=2 if mode == "cotrain" else 1)
    decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and n not in ("cls", "pos")]
    rest = [p for n, p in self.model.named_parameters() if not (p.ndim >= 2 and n not in ("cls", "pos"))]
    self.opt = torch.optim.AdamW([dict(params=decay, weight_decay=1e-4),
                                  dict(params=rest, weight_decay=0.0)], lr=1e-3)
    b = args.batch
    self.images = torch.rand(b, 3, args.image_size, args.image_size)
    self.labels = torch.randint(0, args.num_classes, (b,))

  def step(self):
    a, x, y = self.args, self.images, self.labels
    b = y.shape[0]
    zeros = torch.zeros(b, dtype=torch.long)
    if self.mode == "clean":
      inputs, domains, targets = x, zeros, y
    else:
      adv_domain = zeros + (1 if self.mode == "cotrain" else 0)
      x_adv = pgd(self.model, x, y, adv_domain, a.eps, a.attack_steps, 2.5 * a.eps / a.attack_steps)
      if self.mode == "cotrain":
        inputs, domains, targets = torch.cat([x, x_adv]), torch.cat([zeros, adv_domain]), y.repeat(2)
      else:
        inputs, domains, targets = x_adv, adv_domain, y
    loss = F.cross_entropy(self.model(inputs, domains), targets, reduction="sum") / b
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    return float(loss.detach())


def parse_args(argv=None):
  p = argparse.ArgumentParser(description="PyTorch eager baseline of bench.train_step")
  p.add_argument("--mode", default="cotrain", choices=("clean", "adversarial", "cotrain"))
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--serve", action="store_true")
  for name, default in (("width", 192), ("depth", 6), ("heads", 3), ("mlp", 768),
                        ("image_size", 32), ("patch", 4), ("num_classes", 10), ("batch", 128),
                        ("attack_steps", 2)):
    p.add_argument(f"--{name}", type=int, default=default)
  p.add_argument("--eps", type=float, default=4 / 255)
  return p.parse_args(argv)


def timed(trainer, steps):
  t0 = time.perf_counter()
  for _ in range(steps):
    trainer.step()
  return time.perf_counter() - t0


def main(argv=None):
  args = parse_args(argv)
  trainers = {}
  get = lambda mode: trainers.setdefault(mode, Trainer(mode, args))
  if not args.serve:
    trainer = get(args.mode)
    trainer.step()  # warm-up
    seconds = timed(trainer, args.steps)
    print(json.dumps(dict(mode=args.mode, steps=args.steps, seconds=seconds,
                          images_per_sec=args.steps * args.batch / seconds,
                          torch=torch.__version__, threads=torch.get_num_threads())))
    return
  print(json.dumps(dict(ready=True, torch=torch.__version__, threads=torch.get_num_threads())),
        flush=True)
  for line in sys.stdin:
    words = line.split()
    if not words or words[0] == "quit":
      break
    mode, steps = words[0], int(words[1])
    first = mode not in trainers
    trainer = get(mode)
    if first:
      trainer.step()  # warm-up, not timed
    print(json.dumps(dict(mode=mode, steps=steps, seconds=timed(trainer, steps))), flush=True)


if __name__ == "__main__":
  main()
