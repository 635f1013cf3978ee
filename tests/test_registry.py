"""Tests of the attack registry: budgets belong to attacks, dispatch through the entries, the
runner's padding and compilation accounting, and full precision where numbers are made."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adv_soups import parallel
from adv_soups.attacks import registry, robust_accuracy, runner

KEY = jax.random.PRNGKey(0)


def _batches(x, y, size):
  return [dict(image=x[i:i + size], label=y[i:i + size]) for i in range(0, len(y), size)]


def _linear(seed=0, shape=(4, 4, 1), classes=10):
  d = int(np.prod(shape))
  w = jax.random.normal(jax.random.PRNGKey(seed), (d, classes))
  return lambda x: x.reshape(x.shape[0], -1) @ w


# ---------------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------------
def test_budgets_default_to_each_attacks_own():
  aa = registry.parse_suite("autoattack")
  assert registry.resolve_budgets(aa) == {"apgd-ce": 100, "apgd-t": 100, "fab-t": 100,
                                          "square": 5000}
  # An integer is the iteration attacks' budget only; query attacks change only when named.
  assert registry.resolve_budgets(aa, 20) == {"apgd-ce": 20, "apgd-t": 20, "fab-t": 20,
                                              "square": 5000}
  assert registry.resolve_budgets(aa, {"square": 300})["square"] == 300
  assert registry.resolve_budgets(aa, square_queries=7)["square"] == 7
  assert registry.resolve_steps(("pgd",), None, 10) == {"pgd": 10}  # config.eval.attack_steps
  for bad in (dict(num_steps=0), dict(num_steps={"square": 0}), dict(square_queries=0),
              dict(num_steps={"apgd-t": -1}), dict(num_steps=2.5)):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
      registry.resolve_budgets(aa, **bad)
  with pytest.raises(ValueError, match="no default budget"):
    registry.resolve_budgets(("pgd",))
  with pytest.raises(ValueError, match="does not run"):
    registry.resolve_budgets(("apgd-ce",), {"square": 10})


def test_other_budgets_are_never_called_autoattack():
  aa = registry.parse_suite("autoattack")
  ref = registry.resolve_budgets(aa)
  assert registry.describe(aa, ref).startswith("AutoAttack, standard version")
  assert "Square 5000 queries" in registry.describe(aa, ref)
  assert registry.suite_label(aa, ref) == "autoattack"
  for other in (registry.resolve_budgets(aa, 20), registry.resolve_budgets(aa, {"square": 100})):
    assert "AutoAttack, standard" not in registry.describe(aa, other)
    assert registry.suite_label(aa, other) == "apgd-ce+apgd-t+fab-t+square"


def test_square_budget_zero_is_refused_not_replaced():
  x = np.asarray(jax.random.uniform(KEY, (8, 4, 4, 1)))
  with pytest.raises(ValueError, match="square.*=0 must be an integer >= 1"):
    robust_accuracy(_linear(), _batches(x, np.zeros(8, np.int32), 8), eps=0.1,
                    attacks="square", num_steps={"square": 0})


def _quantised_model():
  """Logits of a linear model on the input rounded to a 1/4 grid: its input gradient is zero
  almost everywhere, so gradient attacks cannot move it and only a score-based one can."""
  w = jax.random.normal(jax.random.PRNGKey(3), (16, 10))
  return lambda x: jnp.round(x.reshape(x.shape[0], -1) * 4) / 4 @ w


@pytest.mark.slow
def test_autoattack_without_budgets_is_the_standard_version():
  """No budget given: Square runs its 5,000 queries (recorded), and it breaks a zero-gradient
  model that APGD-CE, APGD-T and FAB-T (100 iterations each) leave untouched."""
  f = _quantised_model()
  x = np.asarray(jax.random.uniform(jax.random.PRNGKey(4), (16, 4, 4, 1)))
  y = np.asarray(jnp.argmax(f(x), -1)).astype(np.int32)
  r = robust_accuracy(f, _batches(x, y, 16), eps=0.3, attacks="autoattack")
  budgets = {a["name"]: (a["budget"], a["budget_kind"]) for a in r.attacks}
  assert budgets == {"apgd-ce": (100, "iterations"), "apgd-t": (100, "iterations"),
                     "fab-t": (100, "iterations"), "square": (5000, "queries")}
  assert all(a["restarts"] == 1 for a in r.attacks)
  assert [a.get("targets") for a in r.attacks] == [None, 9, 9, None]
  assert r.clean_accuracy == 1
  assert not np.any((r.broken_by >= 0) & (r.broken_by < 3))  # gradients are zero
  assert np.sum(r.broken_by == 3) >= 4  # Square breaks it
  assert r.robust_accuracy == np.mean(r.broken_by < 0)


# ---------------------------------------------------------------------------------------------
# Dispatch through the registry
# ---------------------------------------------------------------------------------------------
def _toy_stage(f, x, y, rng, *, eps, norm, budget, settings, index, rank, step_size):
  """Every pixel + eps (clipped): a one-query 'attack' whose result is easy to predict."""
  del f, y, rng, norm, budget, settings, index, rank, step_size
  return jnp.clip(x + eps, 0.0, 1.0)


@pytest.fixture
def toy_attack():
  entry = registry.register(registry.Attack("toy-shift", "Toy", _toy_stage, budget="queries",
                                            default_steps=1))
  yield entry
  registry.unregister("toy-shift")


def test_a_registered_attack_runs_through_robust_accuracy(toy_attack):
  del toy_attack
  f = _linear(seed=5)
  x = np.asarray(jax.random.uniform(KEY, (24, 4, 4, 1)))
  y = np.asarray(jnp.argmax(f(x), -1)).astype(np.int32)
  eps = 0.2
  r = robust_accuracy(f, _batches(x, y, 8), eps=eps, attacks="toy-shift")
  expected = np.asarray(jnp.argmax(f(jnp.clip(x + eps, 0, 1)), -1)) == y
  assert 0 < expected.mean() < 1  # the check below is not vacuous
  np.testing.assert_array_equal(r.robust, expected)
  assert r.attacks[0]["name"] == "toy-shift" and r.attacks[0]["budget"] == 1
  with pytest.raises(ValueError, match="unknown attack 'toy-nope': allowed .*toy-shift"):
    robust_accuracy(f, _batches(x, y, 8), eps=eps, attacks="toy-nope")
  assert "toy-shift" in registry.parse_suite("apgd-ce,toy-shift")


def test_unregistered_names_are_refused_everywhere():
  with pytest.raises(ValueError, match="unknown attack 'nope': allowed pgd, apgd-ce"):
    registry.get("nope")
  with pytest.raises(ValueError, match="unknown attack 'nope'"):
    registry.parse_suite("apgd-ce,nope")
  with pytest.raises(ValueError, match="already registered"):
    registry.register(registry.ATTACKS["square"])
  with pytest.raises(ValueError, match="suite"):
    registry.register(registry.Attack("autoattack", "AA", _toy_stage))


def test_fab_counts_only_points_within_eps():
  f = _linear(seed=1)
  x = jnp.full((2, 4, 4, 1), 0.5)
  y = jnp.argmax(f(x), -1)
  far = jnp.zeros_like(x)  # misclassified (probably) but outside a small eps
  wrong = np.asarray(jnp.argmax(f(far), -1) != y)
  entry = registry.get("fab-t")
  np.testing.assert_array_equal(
      entry.breaks(f, far, x, y, eps=0.01, norm="linf"), np.zeros(2, bool))
  np.testing.assert_array_equal(entry.breaks(f, far, x, y, eps=0.6, norm="linf"), wrong)
  np.testing.assert_array_equal(registry.get("apgd-ce").breaks(f, far, x, y, eps=0.01,
                                                                norm="linf"), wrong)


# ---------------------------------------------------------------------------------------------
# The runner: padding of partial batches, compilation outside the attacks' seconds
# ---------------------------------------------------------------------------------------------
def test_flush_size():
  assert runner.flush_size(360, 360, 1) == 360
  assert runner.flush_size(275, 360, 1) == 276  # 12 x 23
  assert runner.flush_size(1, 360, 1) == 23
  assert runner.flush_size(5, 64, 8) == 8
  for n in range(1, 361):
    size = runner.flush_size(n, 360, 8)
    assert n <= size <= 360 and size % 8 == 0 and size - n < 360 // 16 + 8


def test_partial_batches_padded_less_give_the_same_results(monkeypatch):
  """Per-example results with the flush padded to a bucket equal those padded to the whole
  batch (random streams are keyed by example), for fewer computed rows."""
  params = dict(w=jax.random.normal(KEY, (48, 10)))
  f = lambda p, x: jnp.tanh(x.reshape(x.shape[0], -1) @ p["w"])
  x = np.asarray(jax.random.uniform(jax.random.PRNGKey(2), (70, 4, 4, 3)))
  y = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (70,), 0, 10))
  kw = dict(eps=0.05, attacks=("apgd-ce", "apgd-t", "square"), params=params, batch_size=64,
            num_steps={"apgd-ce": 4, "apgd-t": 3, "square": 30}, num_targets=3,
            mesh=parallel.make_mesh(jax.devices()[:1]))
  small = robust_accuracy(f, _batches(x, y, 35), **kw)
  monkeypatch.setattr(runner, "FLUSH_BUCKETS", 1)  # the old way: every call a full batch
  full = robust_accuracy(f, _batches(x, y, 35), **kw)
  np.testing.assert_array_equal(small.clean_correct, full.clean_correct)
  np.testing.assert_array_equal(small.broken_by, full.broken_by)
  assert small.clean_accuracy < 1 and 0 <= small.robust_accuracy < small.clean_accuracy
  for a, b in zip(small.attacks, full.attacks):
    assert a["rows_attacked"] == b["rows_attacked"]
    assert a["rows_attacked"] <= a["rows_computed"] < b["rows_computed"]
    assert a["compile_seconds"] > 0 and a["seconds"] > 0


# ---------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------
_DOT = re.compile(r"stablehlo\.(dot_general|convolution)")


def test_attack_stages_lower_with_full_precision():
  """Every dot and convolution of the runner's own compiled stage (a ViT whose config computes
  in bfloat16, rebuilt for evaluation; jax.nn.dot_product_attention inside) carries HIGHEST
  precision and float32 operands."""
  import ml_collections
  from adv_soups import loading
  from adv_soups.evaluation import engine
  from adv_soups.models import create_model, init_params
  cfg = dict(image_size=8, patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32,
             num_classes=10, num_domains=2, channels=1, dtype="bfloat16")
  config = ml_collections.ConfigDict(dict(model=cfg))
  model = create_model(cfg)
  params = init_params(model, KEY, 1)
  loaded = loading.LoadedModel(config=config, model=model, params=params, step=0, workdir="")
  mesh = parallel.make_mesh(jax.devices()[:1])
  b = 2
  args = (params, jnp.zeros((b, 8, 8, 1)), jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32),
          jnp.ones((b,), bool), jnp.arange(b, dtype=jnp.int32), KEY, np.int32(0),
          np.float32(0.1), np.float32(0.0))
  def dots(m):
    fn = runner._attack_fn(engine.model_logits_fn(m), True, True, mesh, "apgd-t", "linf", 2,
                           tuple(registry.get("apgd-t").settings_for("linf").items()))
    return [l for l in fn.lower(*args).as_text().splitlines() if _DOT.search(l)]
  assert any("bf16" in l.rsplit(":", 1)[1] for l in dots(model))  # the config's own dtype
  lines = dots(loaded.with_precision("float32").model)
  assert len(lines) >= 6  # patch conv, attention, MLP, head; forward and backward
  for line in lines:
    assert line.count("HIGHEST") == 2, line
    operands = line.rsplit(":", 1)[1]
    assert "bf16" not in operands and "f32" in operands, line
  assert loaded.with_precision("model").model is model
  with pytest.raises(ValueError, match="precision"):
    loaded.with_precision("half")
