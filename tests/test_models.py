"""ViT, adapters, soups and the summary table."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from adv_soups import soups
from adv_soups.models import ADAPTERS, create_model, init_params, summary

NUM_CLASSES = 5


def tiny_config(adapter="token", num_domains=2, **kw):
  return ml_collections.ConfigDict(dict(variant="tiny/4", num_classes=NUM_CLASSES, adapter=adapter,
                                        num_domains=num_domains, image_size=8, **kw))


def randomize(params, seed):
  """Random values everywhere (zero-initialised heads and tokens would hide domain differences)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
                            for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def images():
  return jax.random.uniform(jax.random.key(1), (6, 8, 8, 3))


def built(adapter, num_domains=2):
  model = create_model(tiny_config(adapter, num_domains))
  params = randomize(init_params(model, jax.random.key(0)), seed=2)
  return model, params


def test_vit_b16_has_the_reference_parameter_count():
  counts = summary.count_by_adapter("B/16", num_classes=1000, image_size=224)
  # google-research/vision_transformer ViT-B/16 (class token with a position embedding).
  assert counts["none"] == (86_567_656, 0)


def vit_param_count(width, depth, mlp_dim, patch, channels, image_size, classes):
  """Parameters of a ViT with one class token, counted layer by layer (independent of our code)."""
  tokens = (image_size // patch) ** 2 + 1
  embed = patch * patch * channels * width + width
  block = 2 * 2 * width + 4 * (width * width + width) + (width * mlp_dim + mlp_dim) + (
      mlp_dim * width + width)
  return embed + width + tokens * width + depth * block + 2 * width + width * classes + classes


def test_domain_specific_counts_follow_the_formula():
  """The package's counts (summary.count_by_adapter) against the layer-by-layer formula."""
  width, depth, classes = 768, 12, 1000
  counts = summary.count_by_adapter("B/16", num_classes=classes, image_size=224)
  base = vit_param_count(width, depth, 3072, 16, 3, 224, classes)
  assert counts["none"] == (base, 0)
  num_norms = 2 * depth + 1
  expected = {"token": width, "norm": num_norms * 2 * width, "head": width * classes + classes}
  for adapter, per_domain in expected.items():
    assert counts[adapter] == (base + per_domain, per_domain), adapter
  assert counts["norm"][1] == 50 * counts["token"][1]  # the paper's "49x fewer" (50x the size)


def test_count_params_of_a_built_model_follows_the_formula():
  """soups.count_params on real parameter trees (2 domains) against the formula."""
  for adapter, extra in (("token", 32), ("norm", (2 * 2 + 1) * 2 * 32), ("none", 0)):
    model = create_model(tiny_config(adapter, width=32, depth=2, num_heads=2, mlp_dim=64,
                                     patch_size=4))
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    base = vit_param_count(32, 2, 64, 4, 3, 8, NUM_CLASSES)
    assert soups.count_params(params) == (base + extra, extra), adapter


def test_summary_table_lists_every_adapter():
  counts = summary.count_by_adapter("tiny/4", num_classes=10, image_size=8)
  table = summary.format_table(counts, "t")
  for adapter in ADAPTERS:
    assert adapter in table
  assert f"{counts['norm'][1]:,}" in table


@pytest.mark.parametrize("adapter", ["token", "norm", "head"])
def test_int_domain_equals_one_hot_weights(adapter, images):
  model, params = built(adapter, num_domains=3)
  domain = jnp.array([0, 1, 2, 1, 0, 2])
  by_int = model.apply({"params": params}, images, domain)
  by_weights = model.apply({"params": params}, images, jax.nn.one_hot(domain, 3))
  np.testing.assert_allclose(by_int, by_weights, atol=1e-6)


@pytest.mark.parametrize("adapter", ["token", "norm", "head"])
def test_domains_with_different_adapters_give_different_logits(adapter, images):
  model, params = built(adapter)
  clean = model.apply({"params": params}, images, jnp.zeros(6, jnp.int32))
  adv = model.apply({"params": params}, images, jnp.ones(6, jnp.int32))
  assert np.abs(clean - adv).max() > 1e-3


def test_adapter_none_ignores_domain(images):
  model, params = built("none")
  clean = model.apply({"params": params}, images, jnp.zeros(6, jnp.int32))
  adv = model.apply({"params": params}, images, jnp.ones(6, jnp.int32))
  np.testing.assert_array_equal(clean, adv)


@pytest.mark.parametrize("adapter", ["token", "norm", "head", "none"])
def test_soup_equals_mixing_weights_forward(adapter, images):
  model, params = built(adapter)
  single = create_model(tiny_config(adapter, num_domains=1))
  for alpha in (0.0, 0.3, 1.0):
    soup = soups.interpolate(params, [1 - alpha, alpha])
    soup_logits = single.apply({"params": soup}, images)
    mixed = model.apply({"params": params}, images, soups.mix_weights([alpha] * 6))
    np.testing.assert_allclose(soup_logits, mixed, atol=1e-5)
  # alpha = 0 and 1 are exactly the clean and robust modes.
  np.testing.assert_allclose(single.apply({"params": soups.interpolate(params, [0.0, 1.0])}, images),
                             model.apply({"params": params}, images, jnp.ones(6, jnp.int32)),
                             atol=1e-5)


def test_soup_params_fit_a_single_domain_model():
  model, params = built("norm")
  soup = soups.interpolate(params, [0.5, 0.5])
  single = init_params(create_model(tiny_config("norm", num_domains=1)), jax.random.key(0))
  assert jax.tree.map(jnp.shape, soup) == jax.tree.map(jnp.shape, single)
  assert soups.num_domains(soup) == 1
  with pytest.raises(ValueError, match="2 weights"):
    soups.interpolate(params, [1.0, 0.0, 0.0])


def test_domain_specific_marks_only_adapter_leaves():
  _, params = built("token")
  flags = jax.tree_util.tree_leaves_with_path(soups.domain_specific(params))
  marked = [jax.tree_util.keystr(p) for p, f in flags if f]
  assert marked == ["['cls_token']['domain_cls']"]
  total, per_domain = soups.count_params(params)
  assert per_domain == 32 and total == sum(x.size for x in jax.tree.leaves(params))


def test_lerp_and_uniform():
  a = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  b = {"w": 3 * jnp.ones((2, 3)), "b": jnp.ones(3)}
  mid = soups.lerp(a, b, 0.25)
  np.testing.assert_allclose(mid["w"], 1.5)
  np.testing.assert_allclose(soups.uniform([a, b, b])["b"], 2 / 3, rtol=1e-6)


@pytest.mark.parametrize("other, message", [
    ({"w": jnp.ones((2, 3))}, "structure"),
    ({"w": jnp.ones((3, 2)), "b": jnp.zeros(3)}, "shape"),
    ({"w": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.zeros(3)}, "dtype"),
])
def test_lerp_and_uniform_reject_mismatches(other, message):
  a = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  with pytest.raises(ValueError, match=message):
    soups.lerp(a, other, 0.5)
  with pytest.raises(ValueError, match=message):
    soups.uniform([a, other])


@pytest.mark.parametrize("field, value, allowed", [
    ("variant", "X/16", "NAME/PATCH"),
    ("variant", "B16", "NAME/PATCH"),
    ("adapter", "lora", "token"),
    ("num_domains", 0, ">= 1"),
    ("image_size", 10, "multiple of the patch"),
])
def test_create_model_rejects_bad_values(field, value, allowed):
  config = tiny_config()
  config[field] = value
  with pytest.raises(ValueError, match=allowed) as info:
    create_model(config)
  assert str(value) in str(info.value)


def test_overrides_replace_variant_sizes():
  model = create_model(tiny_config(width=48, depth=1, num_heads=3, mlp_dim=96, patch_size=2))
  assert (model.width, model.depth, model.num_heads, model.mlp_dim, model.patch_size) == (
      48, 1, 3, 96, 2)


def test_loaded_model_predict_compiles_once_per_batch_shape(images):
  """`adv_soups.load(...).predict`'s jitted forward: one compilation serves every alpha (scalar or
  per example) of a batch shape; a new batch shape compiles once more. Fails if, e.g., alpha 0
  were passed as int domains instead of mixing weights."""
  from adv_soups import loading
  model, params = built("token")
  config = ml_collections.ConfigDict(dict(model=dict(tiny_config("token"), channels=3),
                                          train=dict(mode="cotrain")))
  run = loading.LoadedModel(config=config, model=model, params=params, step=0, workdir="memory")
  outputs = [np.asarray(run.predict(images, alpha=alpha))
             for alpha in (0.0, 0.5, 1.0, np.linspace(0, 1, 6))]
  assert np.abs(outputs[0] - outputs[2]).max() > 1e-3  # the alphas did reach the model
  assert run._predict._cache_size() == 1
  run.predict(images[:4], alpha=0.0)
  run.predict(images[:4], alpha=0.3)
  assert run._predict._cache_size() == 2


def test_dropout_and_drop_path_only_in_training(images):
  model = create_model(tiny_config(dropout_rate=0.5, drop_path_rate=0.5))
  params = randomize(init_params(model, jax.random.key(0)), 3)
  domain = jnp.zeros(6, jnp.int32)
  run = lambda seed: model.apply({"params": params}, images, domain, train=True,
                                 rngs={"dropout": jax.random.key(seed)})
  assert np.abs(run(0) - run(1)).max() > 1e-4
  np.testing.assert_array_equal(model.apply({"params": params}, images, domain),
                                model.apply({"params": params}, images, domain))
