"""The training program: modes, multi-device equivalence, resume, config.json, errors."""
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from adv_soups import checkpoints, data as data_lib, evaluators, parallel, training, training_cli
from adv_soups import workdir as workdir_lib
from adv_soups.attacks.pgd import pgd
from adv_soups.evaluation import periodic
from adv_soups.models import create_model
from configs import digits as digits_config
from configs import imagenet_vit_b16

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def small_config(data_dir, mode="cotrain", **train_overrides):
  """The digits config shrunk for tests: a 1-block ViT, short runs, a small evaluation."""
  config = digits_config.get_config()
  config.data.data_dir = data_dir
  config.model.update(depth=1, width=32, num_heads=2, mlp_dim=64)
  config.train.update(dict(dict(mode=mode, steps=6, batch_size=64, log_every=3,
                                checkpoint_every=3), **train_overrides))
  config.attack.num_steps = 2
  config.eval.update(num_examples=64, batch_size=64, attack_steps=2)
  return config


def params_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.mark.parametrize("mode", training.MODES)
def test_a_few_steps_of_each_mode_lower_the_loss(mode, data_dir):
  config = small_config(data_dir, mode)
  config.attack.eps = 0.03  # a tiny ViT from scratch collapses under eps 0.1 in 30 steps
  config = training.resolve_config(config)
  config.optimizer.update(warmup_steps=0, schedule="constant", learning_rate=5e-3)
  mesh = parallel.make_mesh()
  model = create_model(config.model)
  optimizer = training.make_optimizer(config.optimizer, 30)
  step = training.make_train_step(config, model, optimizer, mesh)
  state = jax.device_put(training.init_state(config, model, optimizer), parallel.replicated(mesh))
  # One fixed batch of real digits: the step must fit it (fresh batches learn too slowly for a
  # fast test, adversarially above all).
  batch = parallel.shard_batch(mesh, next(data_lib.train_iterator(config.data,
                                                                  global_batch_size=64, seed=0)))
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses
  if mode == "cotrain":
    assert {"clean_loss", "adv_loss"} <= set(metrics)
    # The adversarial half is attacked: its loss exceeds the clean half's.
    assert float(metrics["adv_loss"]) > float(metrics["clean_loss"])


def test_cotrain_step_on_8_devices_matches_1_device(data_dir):
  """SGD without clipping, so parameters differ by exactly lr * gradient differences (AdamW's
  scale invariance would hide a gradient that is N times too large)."""
  config = training.resolve_config(small_config(data_dir))
  config.optimizer.update(name="sgd", momentum=0.0, grad_clip_norm=0.0, weight_decay=0.0,
                          warmup_steps=0, schedule="constant", learning_rate=0.5)
  model = create_model(config.model)
  batch = next(data_lib.train_iterator(config.data, global_batch_size=64, seed=0))
  results = {}
  for n in (1, 8):
    mesh = parallel.make_mesh(jax.devices()[:n])
    optimizer = training.make_optimizer(config.optimizer, 10)
    step = training.make_train_step(config, model, optimizer, mesh)
    state = jax.device_put(training.init_state(config, model, optimizer), parallel.replicated(mesh))
    for _ in range(2):
      state, metrics = step(state, parallel.shard_batch(mesh, batch))
    results[n] = (jax.device_get(state.params), float(metrics["grad_norm"]))
  assert results[8][1] == pytest.approx(results[1][1], rel=1e-4)
  params_close(results[8][0], results[1][0], atol=2e-5)


@pytest.mark.slow
def test_resume_after_a_crash_equals_an_uninterrupted_run(data_dir, tmp_path):
  """With EMA on: parameters, optimizer state and EMA parameters of the resumed run are
  bit-identical to the uninterrupted run's (mutation: leave `ema_params` out of the restore)."""
  config = small_config(data_dir)
  config.optimizer.ema_decay = 0.9
  full = training.train_and_evaluate(config, str(tmp_path / "full"))
  # Simulate a crash after the step-3 checkpoint: drop everything step 6 wrote.
  crashed = tmp_path / "crashed"
  training.train_and_evaluate(config, str(crashed))
  manager = checkpoints.Checkpoints(str(crashed))
  assert manager.all_steps() == [3, 6]
  manager._manager.delete(6)
  manager.close()
  shutil.rmtree(crashed / "data_state" / "6")
  resumed = training.train_and_evaluate(config, str(crashed))
  assert int(resumed.state.step) == 6
  params_close(resumed.state.params, full.state.params, atol=0)
  params_close(resumed.state.opt_state, full.state.opt_state, atol=0)
  params_close(resumed.state.ema_params, full.state.ema_params, atol=0)
  # The EMA is its own state: it differs from the parameters (so the check above is not theirs).
  assert any(np.abs(np.asarray(e) - np.asarray(p)).max() > 1e-4 for e, p in zip(
      jax.tree.leaves(full.state.ema_params), jax.tree.leaves(full.state.params)))


def test_config_json_round_trips(data_dir, tmp_path):
  config = training.resolve_config(small_config(data_dir))
  workdir_lib.save_config(str(tmp_path), config)
  loaded = workdir_lib.load_config(str(tmp_path))
  assert workdir_lib.config_to_dict(loaded) == workdir_lib.config_to_dict(config)
  # A loaded config is already resolved: resolving it again changes nothing.
  assert workdir_lib.config_to_dict(training.resolve_config(loaded)) == \
      workdir_lib.config_to_dict(config)
  create_model(loaded.model)


@pytest.mark.slow
def test_nonfinite_loss_stops_training_without_saving_it(data_dir, tmp_path, monkeypatch):
  real = data_lib.train_iterator

  class Poisoned:
    def __init__(self, *args, **kwargs):
      self.inner = real(*args, **kwargs)
      self.count = 0

    def __next__(self):
      batch = next(self.inner)
      self.count += 1
      if self.count == 5:
        batch["image"] = batch["image"] * np.nan
      return batch

    def __getattr__(self, name):
      return getattr(self.inner, name)

  monkeypatch.setattr(training.loop.data_lib, "train_iterator", Poisoned)
  config = small_config(data_dir, checkpoint_every=2)
  with pytest.raises(FloatingPointError, match="at step 5"):
    training.train_and_evaluate(config, str(tmp_path))
  assert checkpoints.Checkpoints(str(tmp_path)).all_steps() == [2, 4]


@pytest.mark.parametrize("group, field, value", [
    ("train", "mode", "semi"), ("data", "name", "mnist3d"), ("optimizer", "name", "lamb"),
    ("attack", "norm", "l1"), ("train", "batch_size", 63), ("eval", "batch_size", 0),
    ("train", "keep_checkpoints", 0), ("optimizer", "ema_decay", 2.0),
    ("train", "label_smoothing", 1.5), ("model", "num_domains", 3)])
def test_bad_config_values_raise_one_clear_error(group, field, value, data_dir):
  config = small_config(data_dir)
  config[group][field] = value
  with pytest.raises(ValueError, match=str(value)):
    training.resolve_config(config)


@pytest.mark.slow
@pytest.mark.parametrize("args, expected", [
    # A fraction eps is accepted (the error is about the mode, parsed after it).
    (["--config=configs/digits.py", "--config.attack.eps=4/255", "--config.train.mode=semi"],
     ["semi", "cotrain"]),
    (["--config=configs/digits.py", "--config.train.stepz=3"], ["stepz"]),
    (["--config=configs/nope.py"], ["nope.py"]),
    (["--config=configs/cifar10_vit.py", "--config.data.data_dir={tmp}/empty"],
     ["cifar10", "{tmp}/empty", "tfds build"]),
])
def test_cli_bad_input_exits_2_and_writes_nothing(args, expected, tmp_path):
  workdir = tmp_path / "run"
  args = [a.format(tmp=tmp_path) for a in args]
  result = subprocess.run([sys.executable, "-m", "adv_soups.train", f"--workdir={workdir}", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "Traceback" not in result.stderr
  for text in expected:
    assert text.format(tmp=tmp_path) in last
  assert not workdir.exists()


def test_a_field_nothing_reads_is_refused(data_dir):
  """A config file setting a field the project does not have (a removed or misspelt one, such as
  the old train.eval_every) is one line naming it, not silently ignored. Mutation: drop the
  `_check_known_fields` call in resolve_config."""
  config = small_config(data_dir)
  config.train.eval_every = 100
  with pytest.raises(ValueError, match=r"config\.train\.eval_every is not a field .* "
                     r"config\.train has: adv_weight, batch_size"):
    training.resolve_config(config)
  config = small_config(data_dir)
  config.evals.extra = evaluators.entry("robust", every=3)  # entries of config.evals are named freely
  assert "extra" in training.resolve_config(config).evals


def test_overrides_parse_in_process_whatever_sys_argv_holds(data_dir, tmp_path):
  """parse_command_line reads the overrides of the argv it is given, not the process's sys.argv
  (ml_collections' config_flags looks at sys.argv; the demo and the experiment parse in
  process). Mutation: drop the sys.argv swap in training_cli.parse_command_line."""
  config, workdir = training_cli.parse_command_line(
      ["prog", "--config=configs/digits.py", f"--workdir={tmp_path / 'w'}",
       "--config.train.steps=7", "--config.attack.eps=1/20", f"--config.data.data_dir={data_dir}"],
      training_cli.define_flags())
  assert config.train.steps == 7 and config.attack.eps == pytest.approx(0.05)
  assert workdir == str(tmp_path / "w") and not (tmp_path / "w").exists()


def test_fraction_overrides_become_numbers():
  assert training_cli.fractions_to_numbers(["--config.attack.eps=4/255", "--workdir=a/b",
                                           "--config.data.data_dir=/x/y"]) == [
      f"--config.attack.eps={4 / 255!r}", "--workdir=a/b", "--config.data.data_dir=/x/y"]


def test_a_different_config_is_refused_unless_overwrite(data_dir, tmp_path):
  config = training.resolve_config(small_config(data_dir))
  workdir = str(tmp_path / "run")
  workdir_lib.save_config(workdir, config)
  training.prepare_workdir(config, workdir, overwrite=False)  # same config: resume
  other = config.copy_and_resolve_references()
  other.train.steps = 7
  with pytest.raises(ValueError, match="train.steps: 6 -> 7"):
    training.prepare_workdir(other, workdir, overwrite=False)
  training.prepare_workdir(other, workdir, overwrite=True)
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  moved = os.listdir(os.path.join(workdir, "previous_runs"))
  assert len(moved) == 1
  assert os.path.exists(os.path.join(workdir, "previous_runs", moved[0], "config.json"))


@pytest.mark.slow
def test_imagenet_config_builds_vit_b16_and_its_step_lowers_on_mock_data(tmp_path):
  config = imagenet_vit_b16.get_config()
  config.train.batch_size = 8
  config = training.resolve_config(config)
  model = create_model(config.model)
  assert (model.width, model.depth, model.patch_size, model.adapter) == (768, 12, 16, "token")
  assert config.attack.eps == pytest.approx(4 / 255)
  with tfds.testing.mock_data(num_examples=16, data_dir=str(tmp_path)):
    batch = next(data_lib.train_iterator(config.data, global_batch_size=8, seed=0))
  assert batch["image"].shape == (8, 224, 224, 3)
  mesh = parallel.make_mesh()
  optimizer = training.make_optimizer(config.optimizer, config.train.steps)
  step = training.make_train_step(config, model, optimizer, mesh)
  state = jax.eval_shape(lambda: training.init_state(config, model, optimizer))
  batch_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  lowered = step.lower(state, batch_shapes)  # traces PGD + the update for ViT-B/16
  out_state, metrics = jax.eval_shape(step, state, batch_shapes)
  assert "stablehlo.while" in lowered.as_text()  # the PGD loop is inside the step
  assert jax.tree.map(lambda x: x.shape, out_state.params) == \
      jax.tree.map(lambda x: x.shape, state.params)
  assert metrics["loss"].shape == ()


def test_weight_decay_only_on_kernels(data_dir):
  """With zero gradients AdamW's update is pure decoupled decay: non-zero exactly on kernels."""
  config = training.resolve_config(small_config(data_dir))
  config.optimizer.update(warmup_steps=0, schedule="constant", weight_decay=0.1)
  optimizer = training.make_optimizer(config.optimizer, 10)
  params = training.init_state(config, create_model(config.model), optimizer).params
  params = jax.tree.map(lambda x: x + 1.0, params)  # no zero leaves (the head starts at zero)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zeros, optimizer.init(params), params)
  decayed = {jax.tree_util.keystr(p) for p, u in jax.tree_util.tree_leaves_with_path(updates)
             if np.abs(np.asarray(u)).max() > 0}
  kernels = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
             if jax.tree_util.keystr(p).endswith("['kernel']")}
  assert decayed == kernels and kernels
  assert not any("pos_embedding" in n or "cls" in n or "bias" in n or "scale" in n
                 for n in decayed)


# ------------------------------------------------------------------------------------------------
# What the step does: EMA, the attacked adapter, the loss weights, label smoothing, the modes.
# Each fixture compiles one step and runs it on one real digits batch; the tests read the states.

@pytest.fixture(scope="module")
def digits_batch(data_dir):
  """One training batch of 64 real digits (host numpy)."""
  config = training.resolve_config(small_config(data_dir))
  return next(data_lib.train_iterator(config.data, global_batch_size=64, seed=0))


def plain_sgd(config, learning_rate=0.5):
  """SGD without momentum, decay, clipping or warm-up: an update is exactly -lr * gradient."""
  config.optimizer.update(name="sgd", momentum=0.0, grad_clip_norm=0.0, weight_decay=0.0,
                          warmup_steps=0, schedule="constant", learning_rate=learning_rate)
  return config


def randomized(params, seed=0):
  """Every parameter plus Gaussian noise (std 0.3): the head and both class tokens start at
  zero, where the logits are constant, PGD has no gradient and the two domains are one."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
                            for x, k in zip(leaves, keys)])


def run_steps(config, batch, num_steps, params_fn=None):
  """Compiles `config`'s step on 8 devices and runs it `num_steps` times on `batch`.

  Returns (model, host states [num_steps + 1] (the initial one first), host metrics per step).
  """
  mesh = parallel.make_mesh()
  model = create_model(config.model)
  optimizer = training.make_optimizer(config.optimizer, 10)
  step = training.make_train_step(config, model, optimizer, mesh)
  state = training.init_state(config, model, optimizer)
  if params_fn is not None:
    params = params_fn(state.params)
    ema = None if state.ema_params is None else jax.tree.map(jnp.copy, params)
    state = state.replace(params=params, opt_state=optimizer.init(params), ema_params=ema)
  state = jax.device_put(state, parallel.replicated(mesh))
  states, metrics = [jax.device_get(state)], []
  for _ in range(num_steps):
    state, m = step(state, parallel.shard_batch(mesh, batch))
    states.append(jax.device_get(state))
    metrics.append(jax.device_get(m))
  return model, states, metrics


def attack_rng(state):
  """The PGD key of the step that starts from `state` (as make_train_step derives it)."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(state.rng)), state.step)
  return jax.random.split(rng)[0]


def pgd_and_ce(config, model):
  """Jitted (params, images, labels, domain, rng) -> (PGD points against `domain`'s adapter, the
  mean CE there under domain `ce_domain`): the training attack of `config`, on one device."""
  a = config.attack

  def fn(params, images, labels, domain, ce_domain, rng):
    domains = jnp.full(labels.shape, domain, jnp.int32)
    logits_fn = lambda x: model.apply({"params": params}, x, domains, train=False)
    x_adv = pgd(logits_fn, images, labels, rng, eps=a.eps, num_steps=a.num_steps,
                step_size=a.step_size, norm=a.norm)
    logits = model.apply({"params": params}, x_adv, jnp.full(labels.shape, ce_domain, jnp.int32))
    return x_adv, jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  return jax.jit(fn)


def mean_ce(model, params, images, labels, domain):
  """Mean CE of `domain`'s model on images [B, H, W, C] (no attack)."""
  logits = model.apply({"params": params}, images, jnp.full(labels.shape, domain, jnp.int32))
  return float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)))


def token_rows(state):
  return np.asarray(state.params["cls_token"]["domain_cls"])


@pytest.fixture(scope="module")
def cotrain_adv_only(data_dir, digits_batch):
  """cotrain, clean_weight 0, adv_weight 2, EMA 0.9, plain SGD: 2 steps from random params."""
  config = training.resolve_config(small_config(data_dir, clean_weight=0.0, adv_weight=2.0))
  config.optimizer.ema_decay = 0.9
  config = plain_sgd(config)
  return (config,) + run_steps(config, digits_batch, 2, randomized)


@pytest.fixture(scope="module")
def cotrain_clean_only(data_dir, digits_batch):
  """cotrain, clean_weight 0.5, adv_weight 0, plain SGD: 1 step from random params."""
  config = plain_sgd(training.resolve_config(small_config(data_dir, clean_weight=0.5,
                                                       adv_weight=0.0)))
  return (config,) + run_steps(config, digits_batch, 1, randomized)


def test_ema_tracks_the_parameters(cotrain_adv_only):
  """ema_k = 0.9 ema_{k-1} + 0.1 params_k over two steps that move the parameters (no warm-up):
  fails with the decay swapped, ema = params, or no EMA update."""
  _, _, states, _ = cotrain_adv_only
  moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(states[2].params),
                                                   jax.tree.leaves(states[0].params)))
  assert moved > 1e-2  # the parameters did move: the checks below can tell the rules apart
  for k in (1, 2):
    expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, states[k - 1].ema_params,
                            states[k].params)
    params_close(states[k].ema_params, expected, atol=1e-6)
  assert training.loop._eval_params(states[2]) is states[2].ema_params


def test_cotrain_crafts_pgd_against_the_adversarial_adapter(cotrain_adv_only, digits_batch):
  """The adversarial half's loss is CE(f(x_adv, 1)) with x_adv from PGD against domain 1 (the
  same key), not against the clean adapter (mutation: `adv_domain` -> CLEAN in craft)."""
  config, model, states, metrics = cotrain_adv_only
  run = pgd_and_ce(config, model)
  args = (states[0].params, digits_batch["image"], digits_batch["label"])
  loss = {d: float(run(*args, d, 1, attack_rng(states[0]))[1]) for d in (0, 1)}
  got = float(metrics[0]["adv_loss"])
  assert abs(loss[0] - loss[1]) > 0.05 * loss[1], loss  # the two adapters' attacks differ
  assert got == pytest.approx(loss[1], rel=1e-3), (got, loss)


def test_loss_weights_scale_their_halves(cotrain_adv_only, cotrain_clean_only):
  """loss = clean_weight * clean CE + adv_weight * adversarial CE; a weight of 0 gives its
  domain's token no gradient (SGD: it stays put) while the other token moves."""
  _, _, states, metrics = cotrain_adv_only  # weights (0, 2)
  m = metrics[0]
  assert float(m["clean_loss"]) > 0.1 and float(m["adv_loss"]) > 0.1
  assert float(m["loss"]) == pytest.approx(2.0 * float(m["adv_loss"]), rel=1e-5)
  before, after = token_rows(states[0]), token_rows(states[1])
  np.testing.assert_array_equal(after[0], before[0])
  assert np.abs(after[1] - before[1]).max() > 1e-4
  _, _, states, metrics = cotrain_clean_only  # weights (0.5, 0)
  m = metrics[0]
  assert float(m["loss"]) == pytest.approx(0.5 * float(m["clean_loss"]), rel=1e-5)
  before, after = token_rows(states[0]), token_rows(states[1])
  np.testing.assert_array_equal(after[1], before[1])
  assert np.abs(after[0] - before[0]).max() > 1e-4


def test_clean_mode_never_attacks_and_smooths_labels(data_dir, digits_batch, monkeypatch):
  """clean mode: PGD is never traced; its loss is the label-smoothed CE computed here from the
  model's logits, q = (1 - s) one_hot + s / K (mutation: smoothing ignored)."""
  calls = []
  monkeypatch.setattr(training.step, "pgd", lambda *a, **k: calls.append(1) or pgd(*a, **k))
  s = 0.2
  config = plain_sgd(training.resolve_config(small_config(data_dir, "clean", label_smoothing=s)))
  model, states, metrics = run_steps(config, digits_batch, 1, randomized)
  assert calls == []
  logits = np.asarray(model.apply({"params": states[0].params}, digits_batch["image"],
                                  np.zeros(64, np.int32)), np.float64)
  log_p = logits - logits.max(1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
  q = np.full(logits.shape, s / 10) + (1 - s) * np.eye(10)[digits_batch["label"]]
  expected = float(np.mean(-(q * log_p).sum(1)))
  plain = float(np.mean(-log_p[np.arange(64), digits_batch["label"]]))
  assert abs(expected - plain) > 1e-2  # smoothing changes this loss measurably
  assert float(metrics[0]["loss"]) == pytest.approx(expected, rel=1e-5)


def test_adversarial_mode_trains_on_pgd_points(data_dir, digits_batch, monkeypatch):
  """adversarial mode: the loss is CE at PGD points against the one domain (same key), which is
  far from the CE at the clean images (mutation: `inputs = images` in that branch)."""
  calls = []
  monkeypatch.setattr(training.step, "pgd", lambda *a, **k: calls.append(1) or pgd(*a, **k))
  config = plain_sgd(training.resolve_config(small_config(data_dir, "adversarial")))
  model, states, metrics = run_steps(config, digits_batch, 1, randomized)
  assert len(calls) == 1
  run = pgd_and_ce(config, model)
  args = (states[0].params, digits_batch["image"], digits_batch["label"])
  x_adv, adv = run(*args, 0, 0, attack_rng(states[0]))
  assert np.abs(np.asarray(x_adv) - digits_batch["image"]).max() > 0.5 * config.attack.eps
  adv = float(adv)
  clean = mean_ce(model, states[0].params, digits_batch["image"], digits_batch["label"], 0)
  assert adv > clean * 1.05, (adv, clean)
  assert float(metrics[0]["loss"]) == pytest.approx(adv, rel=1e-3)


def test_grad_clip_norm_clips_the_global_norm():
  """SGD, lr 1, no momentum: the update is -g * min(1, c / |g|_global), the same direction as g
  (mutation: per-element `optax.clip` instead of `clip_by_global_norm`)."""
  opt = ml_collections.ConfigDict(dict(name="sgd", momentum=0.0, weight_decay=0.0, warmup_steps=0,
                                       schedule="constant", learning_rate=1.0, grad_clip_norm=0.5,
                                       b1=0.9, b2=0.999))
  optimizer = training.make_optimizer(opt, 10)
  params = {"a": jnp.zeros(3), "dense": {"kernel": jnp.zeros((2, 2))}}
  for scale, factor in ((1.0, 0.5 / 5.0), (0.01, 1.0)):  # |g| = 5 (clipped), 0.05 (not)
    grads = {"a": scale * jnp.array([3.0, 0.0, 0.0]),
             "dense": {"kernel": scale * jnp.array([[0.0, 4.0], [0.0, 0.0]])}}
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
      np.testing.assert_allclose(u, -factor * g, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_learning_rate_schedule_follows_the_formula(schedule):
  """Linear warm-up from 0 over w steps, then cosine to 0 at step T (or constant), and the
  optimizer's SGD step at step k is -lr(k) * g."""
  peak, w, total = 0.1, 4, 12
  opt = ml_collections.ConfigDict(dict(name="sgd", momentum=0.0, weight_decay=0.0,
                                       warmup_steps=w, schedule=schedule, learning_rate=peak,
                                       grad_clip_norm=0.0, b1=0.9, b2=0.999))
  def formula(k):
    if k < w:
      return peak * k / w
    if schedule == "constant":
      return peak
    return peak * 0.5 * (1 + np.cos(np.pi * (k - w) / (total - w)))
  lr = training.learning_rate_schedule(opt, total)
  assert float(lr(0)) == 0.0 and float(lr(w)) == pytest.approx(peak)
  assert float(lr(w // 2)) == pytest.approx(peak / 2)
  assert float(lr(total)) == pytest.approx(0.0 if schedule == "cosine" else peak, abs=1e-7)
  if schedule == "cosine":
    assert float(lr((w + total) // 2)) == pytest.approx(peak / 2)
  optimizer = training.make_optimizer(opt, total)
  params = {"a": jnp.zeros(2)}
  state = optimizer.init(params)
  for k in range(total + 1):
    assert float(lr(k)) == pytest.approx(formula(k), abs=1e-7), k
    updates, state = optimizer.update({"a": jnp.ones(2)}, state, params)
    np.testing.assert_allclose(updates["a"], -formula(k), rtol=1e-5, atol=1e-8)


def test_checkpoints_accept_a_relative_workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  manager = checkpoints.Checkpoints("relative/run")
  manager.save(1, {"note": "x"}, params={"w": jnp.ones(3)})
  restored = manager.restore()
  assert restored["meta"]["step"] == 1 and restored["meta"]["note"] == "x"
  np.testing.assert_array_equal(restored["params"]["w"], np.ones(3))
  assert (tmp_path / "relative" / "run" / "checkpoints" / "1").is_dir()


def _while_bodies_have_collectives(hlo: str) -> tuple[int, bool]:
  """(number of while loops, whether any loop body, or what it calls, has a collective)."""
  import re
  computations, name = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if header:
      name = header.group(1)
      computations[name] = []
    elif name is not None:
      computations[name].append(line)
  bodies = re.findall(r"body=%?([\w.\-]+)", hlo)
  seen, todo = set(), list(bodies)
  while todo:
    current = todo.pop()
    if current in seen or current not in computations:
      continue
    seen.add(current)
    text = "\n".join(computations[current])
    todo += re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", text)
  collective = any(op in "\n".join(computations[c]) for c in seen
                   for op in ("all-reduce", "all-gather", "collective-permute", "all-to-all"))
  return len(bodies), collective


def test_train_step_pgd_loop_has_no_collective(data_dir):
  """On 8 devices the only collective is the gradient all-reduce; each device attacks its shard."""
  config = training.resolve_config(small_config(data_dir))
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  model = create_model(config.model)
  optimizer = training.make_optimizer(config.optimizer, 10)
  step = training.make_train_step(config, model, optimizer, mesh)
  state = jax.device_put(training.init_state(config, model, optimizer), parallel.replicated(mesh))
  batch = parallel.shard_batch(mesh, next(data_lib.train_iterator(config.data,
                                                                  global_batch_size=64, seed=0)))
  hlo = step.lower(state, batch).compile().as_text()
  assert "all-reduce" in hlo  # the detector sees the gradient all-reduce outside the loop
  loops, collective_in_loop = _while_bodies_have_collectives(hlo)
  assert loops >= 1 and not collective_in_loop
