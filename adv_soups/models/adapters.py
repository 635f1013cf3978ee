"""The domain-conditioned pieces of the ViT: class token, LayerNorm and classifier head.

An *adapter* is the small set of parameters that differs between domains (0 = clean,
1 = adversarial, ...). Every domain-specific parameter is named with the prefix `domain_` and has a
leading axis of length `num_domains`; `adv_soups.soups` relies on exactly this rule. Each module here
takes `num_domains=None` for its ordinary shared form (used by the adapters that don't own it).

`domain` is either int32 [B] (each example uses exactly its domain's parameters) or float32 mixing
weights [B, num_domains] (each example uses `sum_d w[d] * p[d]`). All three adapters are affine in
their parameters, so mixing weights `[1 - a, a]` give the same output as the parameter soup at `a`.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

DOMAIN_PREFIX = "domain_"


def domain_weights(domain: Any, batch_size: int, num_domains: int) -> jax.Array:
  """Mixing weights [B, num_domains] (float32) from an int domain [B], weights [B, D] or None (= 0)."""
  if domain is None:
    domain = jnp.zeros((batch_size,), jnp.int32)
  domain = jnp.asarray(domain)
  if jnp.issubdtype(domain.dtype, jnp.integer):
    if domain.shape != (batch_size,):
      raise ValueError(f"int domain must have shape [{batch_size}], got {domain.shape}")
    return jax.nn.one_hot(domain, num_domains, dtype=jnp.float32)
  if domain.shape != (batch_size, num_domains):
    raise ValueError(
        f"domain mixing weights must have shape [{batch_size}, {num_domains}], got {domain.shape}")
  return domain.astype(jnp.float32)


def select(param: jax.Array, domain: Any, batch_size: int) -> jax.Array:
  """Per-example parameters [B, ...] from `param` [num_domains, ...].

  An int domain [B] gathers `param[domain]` (exactly that domain's values); weights [B, D] give
  `sum_d w[:, d] * param[d]`; None means domain 0 for every example.
  """
  num_domains = param.shape[0]
  if domain is not None and jnp.issubdtype(jnp.asarray(domain).dtype, jnp.integer):
    domain_weights(domain, batch_size, num_domains)  # shape check
    return jnp.take(param, jnp.asarray(domain), axis=0)
  weights = domain_weights(domain, batch_size, num_domains)
  return jnp.einsum("bd,d...->b...", weights, param.astype(jnp.float32)).astype(param.dtype)


class ClassToken(nn.Module):
  """Prepends a class token to a token sequence [B, N, W] -> [B, N + 1, W]; per domain if set."""
  num_domains: int | None = None

  @nn.compact
  def __call__(self, tokens: jax.Array, domain: Any = None) -> jax.Array:
    batch, _, width = tokens.shape
    if self.num_domains is None:
      cls = self.param("cls", nn.initializers.zeros, (1, 1, width))
      cls = jnp.broadcast_to(cls, (batch, 1, width))
    else:
      cls = self.param(DOMAIN_PREFIX + "cls", nn.initializers.zeros,
                       (self.num_domains, 1, width))
      cls = select(cls, domain, batch)
    return jnp.concatenate([cls.astype(tokens.dtype), tokens], axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def normalize(x: jax.Array, epsilon: float) -> jax.Array:
  """(x - mean) / sqrt(var + epsilon) over the last axis of x [..., W] (LayerNorm without affine).

  Two-pass statistics in float32 at least, and a hand-written backward pass,
  rstd * (g - mean(g) - y * mean(g * y)): what autodiff makes of flax's LayerNorm costs XLA:CPU
  several more passes over [B, N, W] per norm. Equal to `nn.LayerNorm` to float noise (tested).
  """
  return _normalize_forward(x, epsilon)[0]


def _normalize_forward(x, epsilon):
  compute = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(compute)
  centred = xf - xf.mean(-1, keepdims=True)
  rstd = jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + epsilon)
  y = centred * rstd
  return y.astype(x.dtype), (y, rstd)


def _normalize_backward(epsilon, residuals, g):
  del epsilon
  y, rstd = residuals
  gf = g.astype(y.dtype)
  dx = rstd * (gf - gf.mean(-1, keepdims=True) - y * (gf * y).mean(-1, keepdims=True))
  return (dx.astype(g.dtype),)


normalize.defvjp(_normalize_forward, _normalize_backward)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis of [B, ..., W], `scale` / `bias` [W] (flax's names and init)."""
  epsilon: float = 1e-6
  use_affine: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = normalize(x, self.epsilon)
    if not self.use_affine:
      return y
    width = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (width,))
    bias = self.param("bias", nn.initializers.zeros, (width,))
    return y * scale.astype(y.dtype) + bias.astype(y.dtype)


class Norm(nn.Module):
  """LayerNorm over the last axis of [B, ..., W]; scale and bias per domain if `num_domains` is set."""
  num_domains: int | None = None
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, domain: Any = None) -> jax.Array:
    if self.num_domains is None:
      return LayerNorm(self.epsilon, name="ln")(x)
    width = x.shape[-1]
    scale = self.param(DOMAIN_PREFIX + "scale", nn.initializers.ones, (self.num_domains, width))
    bias = self.param(DOMAIN_PREFIX + "bias", nn.initializers.zeros, (self.num_domains, width))
    y = LayerNorm(self.epsilon, use_affine=False, name="ln")(x)
    batch = x.shape[0]
    expand = (batch,) + (1,) * (x.ndim - 2) + (width,)
    scale = select(scale, domain, batch).reshape(expand).astype(y.dtype)
    bias = select(bias, domain, batch).reshape(expand).astype(y.dtype)
    return y * scale + bias


class Head(nn.Module):
  """Linear classifier [B, W] -> logits [B, num_classes]; one per domain if `num_domains` is set.

  Initialised to zero, as in the reference ViT.
  """
  num_classes: int
  num_domains: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, domain: Any = None) -> jax.Array:
    if self.num_domains is None:
      return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=x.dtype,
                      name="dense")(x)
    width = x.shape[-1]
    kernel = self.param(DOMAIN_PREFIX + "kernel", nn.initializers.zeros,
                        (self.num_domains, width, self.num_classes))
    bias = self.param(DOMAIN_PREFIX + "bias", nn.initializers.zeros,
                      (self.num_domains, self.num_classes))
    # All heads on every example, then pick / mix: D small matmuls instead of a [B, W, C] kernel.
    per_domain = jnp.einsum("bw,dwc->bdc", x, kernel.astype(x.dtype)) + bias.astype(x.dtype)
    batch = x.shape[0]
    if domain is not None and jnp.issubdtype(jnp.asarray(domain).dtype, jnp.integer):
      domain_weights(domain, batch, self.num_domains)  # shape check
      return jnp.take_along_axis(per_domain, jnp.asarray(domain)[:, None, None], axis=1)[:, 0]
    weights = domain_weights(domain, batch, self.num_domains).astype(x.dtype)
    return jnp.einsum("bd,bdc->bc", weights, per_domain)
