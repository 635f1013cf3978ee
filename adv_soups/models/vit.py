"""Vision Transformer (Dosovitskiy et al. 2021) whose forward pass takes a domain.

Layout as in google-research/vision_transformer: conv patch embedding (computed as a matmul), a
class token with its own position embedding, pre-norm encoder blocks, a final LayerNorm and a
zero-initialised linear head on the class token. Only the adapter modules of `adapters.py`
(class token, norms, head) read `domain`; the blocks pass it through untouched.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from adv_soups.models import adapters

ADAPTERS = ("token", "norm", "head", "none")

_INV_SQRT2 = 0.7071067811865476  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)


@jax.custom_jvp
def gelu_exact(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU x * Phi(x), elementwise; `nn.gelu(x, approximate=False)` to float noise.

  Written with `erf` and an analytic derivative, Phi(x) + x * phi(x): `nn.gelu` goes through
  `erfc`, whose derivative XLA:CPU expands into piecewise polynomials with per-element coefficient
  tensors (measured: the GELU was ~30% of an input-gradient pass of the standard ViT).
  """
  return x * (0.5 + 0.5 * jax.lax.erf(x * _INV_SQRT2))


@gelu_exact.defjvp
def _gelu_exact_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  cdf = 0.5 + 0.5 * jax.lax.erf(x * _INV_SQRT2)
  pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
  return x * cdf, (cdf + x * pdf) * dx


class PatchEmbedding(nn.Module):
  """Non-overlapping P x P patches of [B, H, W, C] -> tokens [B, (H // P) * (W // P), W_model].

  The stride-P convolution of the reference ViT (same `kernel` [P, P, C, W_model] and `bias`
  parameters, same initialisation; rows / columns past the last whole patch are dropped, as VALID
  padding does), computed as one matmul over flattened patches: XLA:CPU runs the convolution's
  input gradient (an lhs-dilated convolution, in every attack step) as a naive loop, ~38 ms of a
  PGD step of the standard ViT, where the matmul's costs ~1 ms. Equal to the convolution to float
  noise (tested).
  """
  features: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    p, channels = self.patch_size, x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, channels, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    batch, rows, cols = x.shape[0], x.shape[1] // p, x.shape[2] // p
    x = x[:, :rows * p, :cols * p].astype(self.dtype)
    patches = x.reshape(batch, rows, p, cols, p, channels).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(batch, rows * cols, p * p * channels)
    tokens = patches @ kernel.reshape(p * p * channels, self.features).astype(self.dtype)
    return tokens + bias.astype(self.dtype)


class MlpBlock(nn.Module):
  """GELU MLP [B, N, W] -> [B, N, W]."""
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    width = x.shape[-1]
    init = dict(kernel_init=nn.initializers.xavier_uniform(),
                bias_init=nn.initializers.normal(stddev=1e-6), dtype=self.dtype)
    x = nn.Dense(self.mlp_dim, **init)(x)
    x = gelu_exact(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x = nn.Dense(width, **init)(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=not train)


class SelfAttention(nn.Module):
  """Multi-head self-attention [B, N, W] -> [B, N, W] with `jax.nn.dot_product_attention`.

  (Measured on these CPUs: ~25% faster train steps than `nn.MultiHeadDotProductAttention`.)
  """
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    dense = lambda name: nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype,
                                         kernel_init=nn.initializers.xavier_uniform(), name=name)
    q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)
    y = jax.nn.dot_product_attention(q, k, v)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype,
                           kernel_init=nn.initializers.xavier_uniform(), name="out")(y)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block with optional stochastic depth (drop path) [B, N, W] -> [B, N, W]."""
  num_heads: int
  mlp_dim: int
  norm_domains: int | None = None
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  def _drop_path(self, y, train: bool):
    if not train or self.drop_path_rate == 0.0:
      return y
    keep = 1.0 - self.drop_path_rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0], 1, 1))
    return jnp.where(mask, y / keep, 0.0).astype(y.dtype)

  @nn.compact
  def __call__(self, x, domain, train: bool = False):
    y = adapters.Norm(self.norm_domains, name="norm1")(x, domain)
    y = SelfAttention(self.num_heads, dtype=self.dtype, name="attention")(y)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    x = x + self._drop_path(y, train)
    y = adapters.Norm(self.norm_domains, name="norm2")(x, domain)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")(y, train=train)
    return x + self._drop_path(y, train)


class ViT(nn.Module):
  """ViT classifier: images float32 [B, H, W, C] in [0, 1] -> logits float32 [B, num_classes].

  The model normalises with `mean` / `std` itself, so attack budgets are in pixel units.
  `adapter` chooses which parameters are per domain: "token", "norm", "head" or "none".
  """
  num_classes: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  image_size: int
  adapter: str = "token"
  num_domains: int = 2
  mean: Sequence[float] = (0.5,)
  std: Sequence[float] = (0.5,)
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False  # recompute each block's activations in the backward pass (saves memory)

  def _domains_for(self, kind: str) -> int | None:
    return self.num_domains if self.adapter == kind else None

  @nn.compact
  def __call__(self, images, domain: Any = None, *, train: bool = False):
    """`domain`: int32 [B] domain ids, float32 [B, num_domains] mixing weights, or None (domain 0)."""
    if self.adapter == "none":
      domain = None
    x = (images - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
    x = PatchEmbedding(self.width, self.patch_size, self.dtype, name="embedding")(x)
    x = adapters.ClassToken(self._domains_for("token"), name="cls_token")(x, domain)
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                     (1, x.shape[1], self.width))
    x = nn.Dropout(self.dropout_rate)(x + pos.astype(x.dtype), deterministic=not train)
    # nn.remat keeps the module's name, so the parameter tree is the same with and without it.
    block_cls = nn.remat(EncoderBlock, static_argnums=(3,)) if self.remat else EncoderBlock
    for i in range(self.depth):
      rate = self.drop_path_rate * i / max(self.depth - 1, 1)
      x = block_cls(self.num_heads, self.mlp_dim, self._domains_for("norm"), self.dropout_rate,
                    rate, self.dtype, name=f"block{i:02d}")(x, domain, train)
    # LayerNorm is per token, so only the class token (the head's input) is normalised.
    x = adapters.Norm(self._domains_for("norm"), name="final_norm")(x[:, 0], domain)
    logits = adapters.Head(self.num_classes, self._domains_for("head"), name="head")(x, domain)
    return logits.astype(jnp.float32)
