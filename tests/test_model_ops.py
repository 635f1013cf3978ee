"""The ViT's hand-written ops (exact GELU, LayerNorm, patch embedding) equal flax's to float noise.

They replace `nn.gelu(approximate=False)`, `nn.LayerNorm` and the stride-P `nn.Conv` for speed on
XLA:CPU (bench/README.md); checkpoints, timm exports and public weights rely on them computing the
same function with the same parameters.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adv_soups.models import adapters, vit


def test_gelu_exact_equals_flax_exact_gelu_and_its_derivative():
  x = jnp.linspace(-12.0, 12.0, 48_001, dtype=jnp.float32)
  reference = lambda v: nn.gelu(v, approximate=False)
  np.testing.assert_allclose(vit.gelu_exact(x), reference(x), rtol=0, atol=2e-6)
  derivative = lambda f: jax.vmap(jax.grad(f))(x)
  np.testing.assert_allclose(derivative(vit.gelu_exact), derivative(reference), rtol=0, atol=2e-6)
  # The tanh approximation is ~1e-3 away: the tolerance above tells the two forms apart.
  assert np.abs(vit.gelu_exact(x) - nn.gelu(x, approximate=True)).max() > 1e-4


@pytest.mark.parametrize("use_affine", [True, False])
def test_layer_norm_equals_flax_layer_norm_with_gradients(use_affine):
  x = jax.random.normal(jax.random.key(0), (3, 17, 48)) * 3.0 + 1.5
  ours = adapters.LayerNorm(1e-6, use_affine=use_affine)
  reference = nn.LayerNorm(1e-6, use_scale=use_affine, use_bias=use_affine)
  variables = reference.init(jax.random.key(1), x)
  assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(variables)
  variables = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), variables)
  np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), atol=1e-5)
  weights = jax.random.normal(jax.random.key(3), x.shape)
  loss = lambda module: lambda v, images: jnp.sum(module.apply(v, images) * weights)
  got = jax.grad(loss(ours), argnums=(0, 1))(variables, x)
  want = jax.grad(loss(reference), argnums=(0, 1))(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max())),
               got, want)


def test_layer_norm_keeps_bfloat16_outputs_with_float32_statistics():
  x = (jax.random.normal(jax.random.key(0), (2, 5, 32)) * 4 + 100).astype(jnp.bfloat16)
  y = adapters.normalize(x, 1e-6)
  assert y.dtype == jnp.bfloat16
  want = nn.LayerNorm(1e-6, use_scale=False, use_bias=False).apply({}, x.astype(jnp.float32))
  np.testing.assert_allclose(y.astype(jnp.float32), want, atol=2e-2)


@pytest.mark.parametrize("height, width, channels, patch", [(32, 32, 3, 4), (8, 8, 1, 2),
                                                             (30, 31, 3, 4)])
def test_patch_embedding_equals_the_valid_stride_p_convolution(height, width, channels, patch):
  x = jax.random.uniform(jax.random.key(0), (2, height, width, channels))
  ours = vit.PatchEmbedding(24, patch)
  conv = nn.Conv(24, (patch, patch), strides=(patch, patch), padding="VALID")
  variables = ours.init(jax.random.key(1), x)
  # Same parameter names, shapes and initial values as the convolution it replaces.
  jax.tree.map(np.testing.assert_array_equal, variables, conv.init(jax.random.key(1), x))
  variables = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), variables)
  want = conv.apply(variables, x)
  np.testing.assert_allclose(ours.apply(variables, x), want.reshape(2, -1, 24), atol=1e-5)
  grad = lambda f: jax.grad(lambda images: jnp.sum(jnp.sin(f(images))))(x)
  np.testing.assert_allclose(grad(lambda v: ours.apply(variables, v)),
                             grad(lambda v: conv.apply(variables, v)), rtol=1e-5, atol=5e-5)
