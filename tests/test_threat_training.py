"""Multi-threat co-training: the rows of a step, each threat's attack against its own adapter,
and the objective (CE and TRADES)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import perturb
from adv_soups import threats as threats_lib
from adv_soups.attacks import pgd as pgd_lib
from adv_soups.attacks import trades
from adv_soups.models import create_model, init_params
from adv_soups.training import threat_rows


def _threats(**entries):
  config = ml_collections.ConfigDict(dict(threats=threats_lib.ordered(entries)))
  return threats_lib.resolve(config)


@pytest.fixture(scope="module")
def three_domains():
  config = ml_collections.ConfigDict(dict(variant="tiny/4", num_classes=5, adapter="token",
                                          num_domains=3, image_size=8, depth=1, width=32,
                                          num_heads=2, mlp_dim=64))
  model = create_model(config)
  params = perturb(init_params(model, jax.random.key(0)), 0.5, 2)
  images = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
  labels = jnp.asarray([0, 1, 2, 3])

  def logits_fn_of(d):
    return lambda x: model.apply({"params": params}, x, jnp.full((x.shape[0],), d, jnp.int32))
  return model, params, images, labels, logits_fn_of


def test_layout_of_ce_and_trades_threats():
  rows = threat_rows.layout(_threats(linf=dict(norm="linf", eps=0.1),
                                     l2=dict(norm="l2", eps=0.5, loss="trades")))
  assert rows.domains == (0, 1, 2, 2)
  assert rows.sources == (-1, 0, -1, 1)
  assert rows.threat_rows == ((None, 1), (2, 3))
  single = threat_rows.layout(_threats(l2=dict(norm="l2", eps=0.5, loss="trades")), cotrain=False)
  assert single.domains == (0, 0) and single.sources == (-1, 0)


def test_each_threat_is_crafted_against_its_own_adapter(three_domains):
  _, _, images, labels, logits_fn_of = three_domains
  threats = _threats(a=dict(norm="linf", eps=0.05, num_steps=3),
                     b=dict(norm="linf", eps=0.05, num_steps=3))
  rows = threat_rows.layout(threats)
  rng = jax.random.key(3)
  x_a, x_b = jax.jit(lambda im, lb: threat_rows.craft(logits_fn_of, im, lb, rng, threats,
                                                      jnp.int32(0), rows))(images, labels)
  settings = dict(eps=0.05, num_steps=3, step_size=2.5 * 0.05 / 3, norm="linf")
  own_a = pgd_lib.pgd(logits_fn_of(1), images, labels, rng, **settings)
  own_b = pgd_lib.pgd(logits_fn_of(2), images, labels, jax.random.fold_in(rng, 1), **settings)
  shared_b = pgd_lib.pgd(logits_fn_of(1), images, labels, jax.random.fold_in(rng, 1), **settings)
  np.testing.assert_allclose(x_a, own_a, atol=1e-6)
  np.testing.assert_allclose(x_b, own_b, atol=1e-6)
  # same settings and keys, other adapter: another attack (so the check above can fail)
  assert np.abs(np.asarray(shared_b) - np.asarray(own_b)).max() > 1e-3


def test_trades_threat_crafts_with_the_kl_attack():
  """On a linear model whose prediction disagrees with the label, the TRADES threat's examples
  are the KL's maximiser (x - eps), where the label-CE attack would stay at x."""
  w = jnp.stack([jnp.zeros(4), jnp.full(4, 7.5)], axis=1)
  b = jnp.asarray([0.0, float(np.log(9.0)) - 30.0])
  fn = lambda x: x.reshape(x.shape[0], -1) @ w + b
  threats = _threats(t=dict(norm="linf", eps=0.1, num_steps=10, loss="trades"),
                     c=dict(norm="linf", eps=0.1, num_steps=10))
  images = jnp.ones((3, 2, 2, 1))
  x_t, x_c = threat_rows.craft(lambda d: fn, images, jnp.zeros(3, jnp.int32), jax.random.key(0),
                               threats, jnp.int32(0), threat_rows.layout(threats))
  np.testing.assert_allclose(x_t, 0.9, atol=1e-6)
  np.testing.assert_allclose(x_c, 1.0, atol=1e-6)


def test_eps_warmup_scales_each_threat_on_its_own():
  threats = _threats(a=dict(norm="linf", eps=0.1, eps_warmup_steps=10),
                     b=dict(norm="l2", eps=0.5))
  eps_a, step_a = threat_rows.schedule(threats["a"], jnp.int32(5))
  eps_b, _ = threat_rows.schedule(threats["b"], jnp.int32(5))
  np.testing.assert_allclose([eps_a, step_a], [0.05, 0.5 * threats["a"]["step_size"]], rtol=1e-6)
  assert eps_b == 0.5


def test_objective_sums_clean_ce_and_each_threats_weighted_loss():
  threats = _threats(linf=dict(norm="linf", eps=0.1, weight=0.5),
                     l2=dict(norm="l2", eps=0.5, loss="trades", beta=3.0, weight=2.0))
  rows = threat_rows.layout(threats)
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2 * rows.num_rows, 5)), jnp.float32)
  targets = jax.nn.one_hot(jnp.asarray([1, 4]), 5)
  loss, parts = threat_rows.losses(logits, targets, rows, threats, clean_weight=0.7)
  z = logits.reshape(2, rows.num_rows, 5)
  ce = lambda r: optax.softmax_cross_entropy(z[:, r], targets)
  tr = trades.trades_loss(z[:, 2], z[:, 3], targets, 3.0)
  np.testing.assert_allclose(loss, (0.7 * ce(0) + 0.5 * ce(1) + 2.0 * tr).sum() / 2, rtol=1e-6)
  np.testing.assert_allclose(parts["l2"], tr, rtol=1e-6)
  np.testing.assert_allclose(parts["linf"], ce(1), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# The compiled step with three domains (clean, l_inf CE, l_2 TRADES).

from adv_soups import data as data_lib, parallel, training  # noqa: E402
from configs import digits_threats  # noqa: E402


def threats_config(data_dir, **threat_overrides):
  """configs/digits_threats.py shrunk for tests (1-block ViT, PGD-2), l_2 with TRADES."""
  config = digits_threats.get_config()
  config.data.data_dir = str(data_dir)
  config.model.update(depth=1, width=32, num_heads=2, mlp_dim=64)
  config.train.update(steps=4, batch_size=32, log_every=2, checkpoint_every=2)
  config.threats.linf.update(num_steps=2)
  config.threats.l2.update(num_steps=2, loss="trades", beta=3.0, **threat_overrides)
  config.eval.update(num_examples=32, batch_size=96, attack_steps=2)
  config.evals.val.every = 0
  return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def step_parts(data_dir):
  config = training.resolve_config(threats_config(data_dir))
  config.optimizer.update(name="sgd", momentum=0.0, grad_clip_norm=0.0, weight_decay=0.0,
                          warmup_steps=0, schedule="constant", learning_rate=0.5)
  model = training.config.create_model(config.model)
  batch = next(data_lib.train_iterator(config.data, global_batch_size=32, seed=0))
  optimizer = training.make_optimizer(config.optimizer, 10)
  state = training.init_state(config, model, optimizer)
  leaves, treedef = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  params = treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
                              for x, k in zip(leaves, keys)])
  state = state.replace(params=params, opt_state=optimizer.init(params))
  return config, model, optimizer, state, batch


def test_resolved_threats_config_has_a_domain_per_threat(step_parts):
  config = step_parts[0]
  assert config.model.num_domains == 3
  assert list(threats_lib.normalise(config)) == ["linf", "l2"]
  assert config.threats.l2.domain == 2 and config.threats.l2.loss == "trades"


@pytest.mark.slow
def test_three_domain_step_on_8_devices_matches_1_device_and_its_losses(step_parts):
  """Gradients (SGD, no clipping) of 8 devices equal 1 device's; the step's per-threat losses
  are the ones recomputed here: CE at PGD points against domain 1 and TRADES at KL-attack points
  against domain 2 (keys: the step's attack key, folded with 1 for the second threat)."""
  config, model, optimizer, state0, batch = step_parts
  results = {}
  for n in (1, 8):
    mesh = parallel.make_mesh(jax.devices()[:n])
    step = training.make_train_step(config, model, optimizer, mesh)
    state = jax.device_put(jax.tree.map(jnp.copy, state0), parallel.replicated(mesh))
    state, metrics = step(state, parallel.shard_batch(mesh, batch))
    results[n] = (jax.device_get(state.params), jax.device_get(metrics))
  assert results[8][1]["grad_norm"] == pytest.approx(results[1][1]["grad_norm"], rel=1e-4)
  for x, y in zip(jax.tree.leaves(results[8][0]), jax.tree.leaves(results[1][0])):
    np.testing.assert_allclose(x, y, atol=2e-5, rtol=0)
  m = results[1][1]
  rng = jax.random.fold_in(jax.random.wrap_key_data(state0.rng), state0.step)
  rng = jax.random.split(rng)[0]
  images, labels = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
  fn = lambda d: (lambda x: model.apply({"params": state0.params}, x,
                                        jnp.full(x.shape[:1], d, jnp.int32)))
  linf, l2 = config.threats.linf, config.threats.l2
  x_linf = pgd_lib.pgd(fn(1), images, labels, rng, eps=linf.eps, num_steps=2,
                       step_size=linf.step_size, norm="linf")
  x_l2 = trades.kl_attack(fn(2), images, jax.random.fold_in(rng, 1), eps=l2.eps, num_steps=2,
                          step_size=l2.step_size, norm="l2")
  onehot = jax.nn.one_hot(labels, 10)
  ce_linf = optax.softmax_cross_entropy(fn(1)(x_linf), onehot).mean()
  tr = trades.trades_loss(fn(2)(images), fn(2)(x_l2), onehot, 3.0).mean()
  clean = optax.softmax_cross_entropy(fn(0)(images), onehot).mean()
  assert m["adv_loss_linf"] == pytest.approx(float(ce_linf), rel=2e-3)
  assert m["adv_loss_l2"] == pytest.approx(float(tr), rel=2e-3)
  assert m["loss"] == pytest.approx(float(clean + ce_linf + tr), rel=2e-3)


@pytest.mark.slow
def test_three_domain_step_attack_loops_have_no_collective(step_parts):
  from tests.test_train import _while_bodies_have_collectives
  config, model, optimizer, state, batch = step_parts
  mesh = parallel.make_mesh()
  step = training.make_train_step(config, model, optimizer, mesh)
  state = jax.device_put(state, parallel.replicated(mesh))
  hlo = step.lower(state, parallel.shard_batch(mesh, batch)).compile().as_text()
  loops, collective_in_loop = _while_bodies_have_collectives(hlo)
  assert "all-reduce" in hlo and loops >= 2 and not collective_in_loop


@pytest.mark.slow
def test_threats_run_with_mixup_and_eps_warmup_resumes_exactly(data_dir, tmp_path):
  """A three-domain run (TRADES on l_2, mixup, eps warm-up on l_inf) resumed after a crash at
  step 2 ends bit-identical to the uninterrupted run."""
  import shutil
  from adv_soups import checkpoints
  config = threats_config(data_dir)
  config.data.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0)
  config.threats.linf.eps_warmup_steps = 3
  full = training.train_and_evaluate(config, str(tmp_path / "full"))
  crashed = tmp_path / "crashed"
  training.train_and_evaluate(config, str(crashed))
  manager = checkpoints.Checkpoints(str(crashed))
  manager._manager.delete(4)
  manager.close()
  shutil.rmtree(crashed / "data_state" / "4")
  resumed = training.train_and_evaluate(config, str(crashed))
  assert int(resumed.state.step) == 4
  for x, y in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(full.state.params)):
    np.testing.assert_array_equal(x, y)
