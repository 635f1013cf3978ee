"""Test setup: 8 simulated CPU devices for every test, so multi-device code is tested in-process.

Tests that compare with a single device build a mesh over `jax.devices()[:1]`.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No persistent compilation cache for the programs tests run (here or as subprocesses): each test
# compiles what it runs (tests/test_compile_cache.py tests the cache). A session-wide cache was
# measured: no faster (most of the suite is not compilation), 1,400 files of tiny eager ops.
os.environ["ADV_SOUPS_COMPILATION_CACHE"] = "off"

import pytest


def tiny_digits_config(data_dir, **train_overrides):
  """configs/digits.py shrunk for tests: a 1-block ViT (width 32), short run, small evaluation."""
  from configs import digits  # cwd is the repo root under pytest
  config = digits.get_config()
  config.data.data_dir = str(data_dir)
  config.model.update(depth=1, width=32, num_heads=2, mlp_dim=64)
  config.train.update(dict(dict(steps=150, batch_size=64, log_every=50, checkpoint_every=0),
                           **train_overrides))
  config.evals.val.every = 0  # only at the end
  # eps 0.03 and a short warmup at a higher rate: at the digits default (eps 0.1) this tiny ViT
  # barely learns in 150 steps, and a sweep over a collapsed model would test little.
  config.attack.update(num_steps=2, eps=0.03)
  config.optimizer.update(learning_rate=5e-3, warmup_steps=10)
  config.eval.update(num_examples=64, batch_size=64, attack_steps=2)
  return config


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """(workdir, data_dir) of a tiny digits co-training run, trained once per test session."""
  from adv_soups import training
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  workdir = str(tmp_path_factory.mktemp("trained") / "workdir")
  training.train_and_evaluate(tiny_digits_config(data_dir), workdir)
  return workdir, data_dir


@pytest.fixture(scope="session")
def trained_workdir(trained_run):
  """The workdir of `trained_run` (config.json + checkpoint of a tiny co-trained digits ViT)."""
  return trained_run[0]


def perturb(tree, std, seed):
  """`tree` + std * N(0, 1) noise on every leaf (one key per leaf from jax.random.key(seed))."""
  import jax
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + std * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])


def write_untrained_workdir(workdir, config, step=1, noise=0.0, ema_noise=None):
  """config.json + one checkpoint of freshly initialised parameters (no training), for tests of
  loading and evaluation that need a workdir but not a trained model. `noise`: the std of Gaussian
  noise added to every parameter (so that zero-initialised heads and tokens differ); with
  `ema_noise`, also an `ema_params` item (params + that much more noise). Returns the resolved
  config and the saved parameters {'params': ..., 'ema_params': ...}."""
  import jax
  from adv_soups import checkpoints, training, workdir as workdir_lib
  from adv_soups.models import create_model, init_params
  config = training.resolve_config(config)
  workdir_lib.save_config(str(workdir), config)
  params = init_params(create_model(config.model), jax.random.key(config.seed),
                       config.model.channels)
  saved = {"params": perturb(params, noise, 1) if noise else params}
  if ema_noise is not None:
    saved["ema_params"] = perturb(saved["params"], ema_noise, 2)
  manager = checkpoints.Checkpoints(str(workdir))
  manager.save(step, {}, **saved)
  manager.close()
  return config, saved


@pytest.fixture(scope="session")
def single_domain_workdir(trained_run, tmp_path_factory):
  """An untrained single-domain (mode 'clean') digits workdir sharing `trained_run`'s data_dir."""
  workdir = tmp_path_factory.mktemp("single") / "workdir"
  write_untrained_workdir(workdir, tiny_digits_config(trained_run[1], mode="clean"))
  return str(workdir)


@pytest.fixture
def workdir_copy(trained_run, tmp_path):
  """A private copy of `trained_run`'s workdir, for tests that write reports into it (the
  session's workdir stays as trained, whatever order the tests run in)."""
  import shutil
  copy = tmp_path / "workdir"
  shutil.copytree(trained_run[0], copy)
  return str(copy)


def jaxpr_eqns(jaxpr):
  """All equations of a (closed) jaxpr, sub-jaxprs (while, scan, cond, pjit, custom_jvp...)
  included: for tests that look for an operation (a parameter gradient, a collective)."""
  from jax.extend import core as jex_core
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    yield eqn
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        if isinstance(sub, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
          yield from jaxpr_eqns(sub)
