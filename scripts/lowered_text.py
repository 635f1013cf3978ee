"""Dumps the lowered StableHLO text of the train step and of one periodic evaluation, to show that
a refactoring leaves the computation alone.

  PYTHONPATH=/path/to/checkout python scripts/lowered_text.py OUT_DIR
  diff -r OUT_BEFORE OUT_AFTER   # identical text = identical programs handed to XLA

Train steps (lowered with abstract shapes, nothing compiled): the digits config and the
`bench.train_step` standard config (Ti/4-sized, 32 px, batch 128, PGD-2), each in the three
modes, plus digits with mixup, label smoothing, EMA, eps warm-up and `trainable=adapters`.
Evaluation: one `config.evals` entry (PGD-2 on clean, adversarial and the 0.5 soup) run on 16
digits test images at the initial parameters, recording the lowered text of every jitted call.
`as_text()` leaves out source locations, so moved code lowers to the same text.
"""
from __future__ import annotations

import os
import sys

import jax


def _training():
  try:  # after the split
    from adv_soups import training as lib
    lib.make_train_step  # pylint: disable=pointless-statement
    return lib
  except (ImportError, AttributeError):
    from adv_soups import train as lib
    return lib


def digits_config(mode: str, recipe: bool = False):
  from configs import digits
  config = digits.get_config()
  config.train.mode = mode
  if recipe:
    config.data.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0)
    config.train.update(label_smoothing=0.1, trainable="adapters")
    config.optimizer.ema_decay = 0.9
    config.attack.eps_warmup_steps = 10
  return config


def bench_config(mode: str):
  from adv_soups import config_base
  config = config_base.base_config()
  config.model.update(variant="Ti/4", width=192, depth=6, num_heads=3, mlp_dim=768, patch_size=4,
                      image_size=32, num_classes=10, adapter="token", dtype="float32",
                      remat=False)
  config.data.name = "cifar10"
  config.train.update(mode=mode, batch_size=128)
  config.attack.update(norm="linf", eps=4 / 255, num_steps=2)
  return config


def lowered_step(config) -> str:
  """The lowered text of the train step of `config` (abstract state and batch)."""
  from adv_soups import parallel
  from adv_soups.models import create_model
  lib = _training()
  config = lib.resolve_config(config)
  mesh = parallel.make_mesh()
  model = create_model(config.model)
  optimizer = lib.make_optimizer(config.optimizer, config.train.steps,
                                 config.train.get("trainable", "all"))
  state = jax.eval_shape(lambda: lib.init_state(config, model, optimizer))
  size, batch = config.model.image_size, config.train.batch_size
  abstract = {"image": jax.ShapeDtypeStruct((batch, size, size, config.model.channels), "float32"),
              "label": jax.ShapeDtypeStruct((batch,), "int32")}
  step = lib.make_train_step(config, model, optimizer, mesh)
  return step.lower(state, abstract).as_text()


def lowered_evaluation() -> list[str]:
  """The lowered text of every distinct jitted call of one periodic evaluation."""
  from adv_soups.evaluation import periodic
  from adv_soups.models import create_model, init_params
  lib = _training()
  config = digits_config("cotrain")
  config.evals.val.update(attack="pgd", steps=2, num_examples=16, batch_size=24,
                          domains="clean,adversarial,0.5")
  config = lib.resolve_config(config)
  model = create_model(config.model)
  params = init_params(model, jax.random.key(0), config.model.channels)
  texts: dict[str, None] = {}
  real_jit = jax.jit

  def recording_jit(fun, *args, **kwargs):
    jitted = real_jit(fun, *args, **kwargs)

    class Recorder:
      def __call__(self, *a, **k):
        texts[jitted.lower(*a, **k).as_text()] = None
        return jitted(*a, **k)

      def __getattr__(self, name):
        return getattr(jitted, name)
    return Recorder()

  jax.jit = recording_jit
  try:
    metrics = periodic.evaluate(config, model, params, 0, ["val"], "")
  finally:
    jax.jit = real_jit
  print("evaluation metrics:", metrics)
  return list(texts)


def main(out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  jobs = [(f"digits_{m}", lambda m=m: digits_config(m)) for m in ("cotrain", "adversarial", "clean")]
  jobs += [(f"digits_recipe_{m}", lambda m=m: digits_config(m, True))
           for m in ("cotrain", "adversarial", "clean")]
  jobs += [(f"bench_{m}", lambda m=m: bench_config(m)) for m in ("cotrain", "adversarial", "clean")]
  for name, make in jobs:
    with open(os.path.join(out_dir, f"step_{name}.mlir"), "w") as f:
      f.write(lowered_step(make()))
    print("lowered", name, flush=True)
  for i, text in enumerate(lowered_evaluation()):
    with open(os.path.join(out_dir, f"eval_{i}.mlir"), "w") as f:
      f.write(text)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python scripts/lowered_text.py OUT_DIR")
  main(sys.argv[1])
