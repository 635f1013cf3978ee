"""Programs that lower everywhere: the train step (f32, bf16, remat; mixup and the eps warm-up
on), every attack stage of the runner and `predict` over soups are exported with `jax.export`
for TPU and CUDA from this CPU-only machine, at tiny shapes, one export per program.

Lowering is not compiling: a TPU or GPU *compile* error (e.g. out of memory, an unsupported
layout) stays out of reach here; what this catches is a primitive or a custom call with no
lowering rule for the platform. `test_a_cpu_only_primitive_is_caught` shows the check can fail.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.interpreters import mlir

from adv_soups import loading, parallel, training
from adv_soups.attacks import registry, runner
from adv_soups.models import create_model
from configs import digits as digits_config

PLATFORMS = ("tpu", "cuda")
pytestmark = pytest.mark.skipif(
    not hasattr(jax, "export") or not hasattr(jax.export, "export"),
    reason="this jax has no jax.export with several platforms")


def export_everywhere(fn, *args):
  """Lowers `fn` (jitted) for TPU and CUDA; raises when either platform cannot lower it."""
  return jax.export.export(fn, platforms=PLATFORMS)(*args)


def tiny_config(**model):
  config = digits_config.get_config()
  config.model.update(dict(dict(depth=1, width=16, num_heads=2, mlp_dim=32), **model))
  config.train.update(batch_size=16)  # 2 per device of 8: mixup pairs
  config.attack.update(num_steps=2, eps_warmup_steps=3)
  config.data.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0)
  return training.resolve_config(config)


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh(jax.devices()[:1])


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@pytest.mark.parametrize("model", [dict(), dict(dtype="bfloat16"), dict(remat=True)],
                         ids=["f32", "bf16", "remat"])
def test_train_step_lowers_for_tpu_and_cuda(model, mesh):
  config = tiny_config(**model)
  net = create_model(config.model)
  optimizer = training.make_optimizer(config.optimizer, 10)
  state = jax.eval_shape(lambda: training.init_state(config, net, optimizer))
  size = config.model.image_size
  batch = {"image": jax.ShapeDtypeStruct((16, size, size, 1), jnp.float32),
           "label": jax.ShapeDtypeStruct((16,), jnp.int32)}
  exported = export_everywhere(training.make_train_step(config, net, optimizer, mesh), state, batch)
  assert exported.platforms == PLATFORMS


@functools.lru_cache(maxsize=1)
def soup_model():
  config = tiny_config()
  net = create_model(config.model)
  params = jax.eval_shape(lambda: training.init_state(
      config, net, training.make_optimizer(config.optimizer, 10)).params)
  return config, net, params


def stage_args(params, batch=4, num_classes=10):
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
  return (params, spec((batch, 8, 8, 1), jnp.float32), spec((batch,), jnp.int32),
          spec((batch, 2), jnp.float32), spec((batch,), jnp.bool_), spec((batch,), jnp.int32),
          spec((2,), jnp.uint32), spec((), jnp.int32), spec((), jnp.float32),
          spec((), jnp.float32))


@pytest.mark.parametrize("attack", ["clean"] + list(registry.ATTACKS))
def test_every_attack_stage_lowers_for_tpu_and_cuda(attack, mesh):
  """Every entry of the attack registry as the runner compiles it (soup columns: mixing-weight
  domains; l_inf, the standard version's settings, budget 2); targeted attacks are one program
  for every target rank (the rank is an argument)."""
  _, net, params = soup_model()
  from adv_soups.evaluation import engine
  logits_fn = engine.model_logits_fn(net)
  args = stage_args(params)
  if attack == "clean":
    fn = runner._clean_fn(logits_fn, True, True, mesh)
    args = args[:7]  # ... mask, the example index and the key of a randomised model's draws
  else:
    settings = registry.get(attack).settings_for("linf", registry.STANDARD)
    fn = runner._attack_fn(logits_fn, True, True, mesh, attack, "linf", 2,
                           tuple(sorted(settings.items())))
  export_everywhere(fn, *args)


def test_predict_over_soups_lowers_for_tpu_and_cuda():
  config, net, params = soup_model()
  loaded = loading.LoadedModel(config=config, model=net, params=params, step=0, workdir="")
  export_everywhere(loaded._predict, params, jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.float32),
                    jax.ShapeDtypeStruct((4, 2), jnp.float32))


def cpu_only_primitive():
  """A primitive with a lowering rule for the CPU only (what a CPU-only custom call is)."""
  try:
    from jax.extend.core import Primitive
  except ImportError:  # older jax
    from jax.core import Primitive
  prim = Primitive("adv_soups_cpu_only_double")
  prim.def_impl(lambda x: 2 * x)
  prim.def_abstract_eval(lambda x: x)
  mlir.register_lowering(prim, mlir.lower_fun(lambda x: 2 * x, multiple_results=False),
                         platform="cpu")
  return prim


def test_a_cpu_only_primitive_is_caught():
  prim = cpu_only_primitive()
  fn = jax.jit(lambda x: prim.bind(x) + 1)
  np.testing.assert_allclose(fn(jnp.ones(3)), 3.0)  # it runs (and lowers) on the CPU
  with pytest.raises(NotImplementedError, match="tpu|cuda"):
    export_everywhere(fn, jax.ShapeDtypeStruct((3,), jnp.float32))
