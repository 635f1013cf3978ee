"""The parts of the PyTorch eager co-training step (`bench/torch_step.py`), timed one by one for
`bench.step_parts`: forward, one input-gradient pass (a PGD iteration), the parameter gradient
on the 2B-row co-training batch, the optimizer (clipping + AdamW), and the whole step.

  .venv-torch/bin/python bench/torch_parts.py --serve      # stdin 'PART N' -> {"seconds": s}
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_step  # noqa: E402  pylint: disable=wrong-import-position

PARTS = ("forward", "input_grad", "param_grad", "optimizer", "step")


def make_parts(args) -> dict:
  trainer = torch_step.Trainer("cotrain", args)
  model, opt, x, y = trainer.model, trainer.opt, trainer.images, trainer.labels
  b = y.shape[0]
  adv = torch.ones(b, dtype=torch.long)
  inputs, domains, targets = torch.cat([x, x]), torch.cat([adv * 0, adv]), y.repeat(2)

  def forward():
    with torch.no_grad():
      model(x, adv)

  def input_grad():
    for p in model.parameters():
      p.requires_grad_(False)
    xa = x.clone().requires_grad_(True)
    torch.autograd.grad(F.cross_entropy(model(xa, adv), y, reduction="sum"), xa)
    for p in model.parameters():
      p.requires_grad_(True)

  def param_grad():
    opt.zero_grad(set_to_none=True)
    (F.cross_entropy(model(inputs, domains), targets, reduction="sum") / b).backward()

  param_grad()

  def optimizer():
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  return dict(forward=forward, input_grad=input_grad, param_grad=param_grad,
              optimizer=optimizer, step=trainer.step)


def main(argv=None):
  args = torch_step.parse_args(argv)
  parts = make_parts(args)
  for fn in parts.values():
    fn()  # warm-up
  print(json.dumps(dict(ready=True, torch=torch.__version__, threads=torch.get_num_threads())),
        flush=True)
  for line in sys.stdin:
    words = line.split()
    if not words or words[0] == "quit":
      break
    fn, n = parts[words[0]], int(words[1])
    t0 = time.perf_counter()
    for _ in range(n):
      fn()
    print(json.dumps(dict(part=words[0], seconds=(time.perf_counter() - t0) / n)), flush=True)


if __name__ == "__main__":
  main()
