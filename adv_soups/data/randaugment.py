"""RandAugment in tf.data, with timm's semantics for `rand-m9-mstd0.5-inc1` (the paper's recipe).

`randaugment(image, seed, ...)` takes one uint8 image [H, W, C] (C = 1 or 3, any size >= 1 px)
and returns a uint8 image of the same shape. Per image, `num_ops` operations are drawn with
replacement from the 15 "increasing" ops below; each is applied with probability `prob`, at a
magnitude drawn from N(magnitude, magnitude_std) and clipped to [0, 10]. Rotate, shear, translate
and the four enhance ops take a random sign. Every random choice is `tf.random.stateless_*` of
`seed`, so the result is a pure function of (seed, image): the pipeline passes the per-element
seed it derives from (config seed, process index, position in the stream), so exact resume holds.

The ops and their arguments at magnitude m (timm's `auto_augment.py`, `_RAND_INCREASING_TRANSFORMS`
and `LEVEL_TO_ARG`; what PIL computes, integer rounding included):
  AutoContrast          per channel, stretch [min, max] to [0, 255] (PIL's truncating LUT)
  Equalize              per channel, PIL's histogram equalisation
  Invert                255 - x
  Rotate                +-30 m/10 degrees, about the centre
  PosterizeIncreasing   keep 4 - int(4 m/10) high bits (m = 0 keeps 4 bits: not the identity)
  SolarizeIncreasing    invert pixels >= 256 - int(256 m/10)
  SolarizeAdd           pixels < 128 get + int(110 m/10), clipped to 255
  Color/Contrast/Brightness/SharpnessIncreasing
                        PIL's ImageEnhance with factor max(0.1, 1 +- 0.9 m/10)
  ShearX, ShearY        shear +-0.3 m/10
  TranslateXRel/YRel    shift by +-0.45 m/10 of the width / height
Geometric ops fill with `fill` (timm fills with its `img_mean`, the ImageNet mean pixel
(124, 116, 104)) and sample bilinearly with PIL's pixel-centre convention (a point outside the
image is fill; inside, the neighbours clamp to the edge). timm picks bilinear or bicubic at random;
TF's projective transform has no bicubic, so we always use bilinear. A 3-value fill on a 1-channel
image is converted to grey with PIL's rule (L = (19595 R + 38470 G + 7471 B + 2^15) >> 16).

Implementation: our own, in TF ops. The maintained TF versions (tensorflow/models'
`official/vision/ops/augment.py`, big_vision's copy of the TPU AutoAugment, KerasCV's RandAugment)
draw with stateful `tf.random` ops, so they would break exact resume, and their op set and level
arguments differ from timm's increasing variants.
"""
from __future__ import annotations

import math
from typing import Sequence

from etils import epy

with epy.lazy_imports():  # TensorFlow loads at the first op, not on import (config checks)
  import tensorflow as tf

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
       "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
       "TranslateYRel")
MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitudes are clipped to [0, MAX_LEVEL]
IMAGENET_FILL = (124, 116, 104)  # timm's img_mean: round(255 * (0.485, 0.456, 0.406))


# ----------------------------------------------------------------------------------------------
# Helpers (uint8 images [H, W, C]).

def _grey(image: tf.Tensor) -> tf.Tensor:
  """PIL's RGB -> L conversion as int32 [H, W, 1]; a 1-channel image is returned as int32."""
  x = tf.cast(image, tf.int32)
  if image.shape[-1] == 1:
    return x
  r, g, b = tf.unstack(x, axis=-1)
  return tf.expand_dims(tf.bitwise.right_shift(r * 19595 + g * 38470 + b * 7471 + 0x8000, 16), -1)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL's Image.blend(degenerate, image, factor): d + factor * (x - d), clipped, truncated."""
  d = tf.cast(degenerate, tf.float32)
  out = d + factor * (tf.cast(image, tf.float32) - d)
  return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def _per_channel_lut(image: tf.Tensor, lut_fn) -> tf.Tensor:
  """Applies `lut_fn(channel int32 [H, W]) -> lut int32 [256]` to each channel."""
  x = tf.cast(image, tf.int32)
  channels = [tf.gather(lut_fn(x[..., c]), x[..., c]) for c in range(image.shape[-1])]
  return tf.cast(tf.stack(channels, axis=-1), tf.uint8)


# ----------------------------------------------------------------------------------------------
# Pixel ops: fn(image uint8 [H, W, C], level) -> uint8 [H, W, C].

def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """PIL's ImageOps.autocontrast (cutoff 0): each channel's [lo, hi] mapped to [0, 255] with
  lut[i] = int(i * 255 / (hi - lo) - lo * 255 / (hi - lo)) (float64); identity where hi <= lo."""
  def lut(channel):
    lo = tf.cast(tf.reduce_min(channel), tf.float64)
    hi = tf.cast(tf.reduce_max(channel), tf.float64)
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    values = tf.floor(tf.range(256, dtype=tf.float64) * scale - lo * scale)
    stretched = tf.cast(tf.clip_by_value(values, 0.0, 255.0), tf.int32)
    return tf.where(hi > lo, stretched, tf.range(256))
  return _per_channel_lut(image, lut)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """PIL's ImageOps.equalize per channel: step = (N - count of the top value) // 255, then
  lut[i] = (step // 2 + #pixels below i) // step (clipped to 255); identity where step = 0."""
  def lut(channel):
    histogram = tf.math.bincount(tf.reshape(channel, [-1]), minlength=256, maxlength=256)
    top_count = histogram[tf.reduce_max(channel)]
    step = (tf.reduce_sum(histogram) - top_count) // 255
    below = tf.cumsum(histogram, exclusive=True)
    equalized = tf.minimum((step // 2 + below) // tf.maximum(step, 1), 255)
    return tf.where(step > 0, equalized, tf.range(256))
  return _per_channel_lut(image, lut)


def invert(image: tf.Tensor) -> tf.Tensor:
  """255 - x."""
  return 255 - image


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
  """Keeps the `bits` (int, 0..8) most significant bits of each pixel (0 bits: black)."""
  mask = tf.bitwise.bitwise_and(tf.bitwise.left_shift(255, 8 - bits), 255)
  return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.uint8)


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
  """Pixels >= threshold (int, 0..256) become 255 - x."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < threshold, x, 255 - x), tf.uint8)


def solarize_add(image: tf.Tensor, addition: tf.Tensor, threshold: int = 128) -> tf.Tensor:
  """Pixels < threshold get + addition (int), clipped to 255."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < threshold, tf.minimum(x + addition, 255), x), tf.uint8)


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL's ImageEnhance.Color: blend with the grey image (the identity on 1 channel)."""
  if image.shape[-1] == 1:
    return image
  degenerate = tf.broadcast_to(tf.cast(_grey(image), tf.uint8), tf.shape(image))
  return _blend(degenerate, image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL's ImageEnhance.Contrast: blend with the constant int(mean grey + 0.5)."""
  mean = tf.reduce_mean(tf.cast(_grey(image), tf.float64))
  degenerate = tf.fill(tf.shape(image), tf.cast(tf.floor(mean + 0.5), tf.float32))
  return _blend(degenerate, image, factor)


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL's ImageEnhance.Brightness: blend with black."""
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL's ImageEnhance.Sharpness: blend with PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13,
  rounded; the one-pixel border keeps the original pixels)."""
  channels = image.shape[-1]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
  x = tf.cast(image, tf.float32)
  smooth = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "SAME")[0]
  smooth = tf.floor(tf.clip_by_value(smooth + 0.5, 0.0, 255.0))
  shape = tf.shape(image)
  rows = tf.range(shape[0])[:, None, None]
  cols = tf.range(shape[1])[None, :, None]
  interior = (rows > 0) & (rows < shape[0] - 1) & (cols > 0) & (cols < shape[1] - 1)
  degenerate = tf.where(interior, smooth, x)
  return _blend(degenerate, image, factor)


# ----------------------------------------------------------------------------------------------
# Geometric ops: PIL affine transforms (output -> input), bilinear, filled outside.

def _fill_pixel(fill: Sequence[int], channels: int) -> list[float]:
  fill = [int(v) for v in fill]
  if len(fill) == channels:
    return [float(v) for v in fill]
  if len(fill) == 1:
    return [float(fill[0])] * channels
  if len(fill) == 3 and channels == 1:
    r, g, b = fill
    return [float((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16)]
  raise ValueError(f"RandAugment fill {tuple(fill)} does not fit a {channels}-channel image: "
                   f"give 1 or {channels} values")


def affine(image: tf.Tensor, matrix: Sequence[tf.Tensor], fill: Sequence[int]) -> tf.Tensor:
  """PIL's `image.transform(size, AFFINE, matrix, BILINEAR, fillcolor=fill)` on uint8 [H, W, C].

  matrix (a, b, c, d, e, f) maps an output point to the input point (a x + b y + c, d x + e y + f)
  in PIL's continuous coordinates (pixel i covers [i, i + 1)). A point outside [0, W) x [0, H)
  gets `fill`; inside, bilinear interpolation with neighbours clamped to the edge, truncated to
  uint8 as PIL does (PIL interpolates in float64, we in float32: rarely 1 level apart).
  """
  a, b, c, d, e, f = [tf.cast(v, tf.float32) for v in matrix]
  # The same map in pixel-index coordinates (centre of pixel i at i): x_in = a x + b y + c'.
  c_index = a * 0.5 + b * 0.5 + c - 0.5
  f_index = d * 0.5 + e * 0.5 + f - 0.5
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  transform = tf.stack([a, b, c_index, d, e, f_index, 0.0, 0.0])[None]
  x = tf.cast(image, tf.float32)[None]
  # NEAREST fill mode clamps the sample point to the image: the edge clamping of PIL's bilinear.
  sampled = tf.raw_ops.ImageProjectiveTransformV3(
      images=x, transforms=transform, output_shape=tf.stack([height, width]),
      fill_value=0.0, interpolation="BILINEAR", fill_mode="NEAREST")[0]
  ys = tf.cast(tf.range(height), tf.float32)[:, None]
  xs = tf.cast(tf.range(width), tf.float32)[None, :]
  x_in = a * (xs + 0.5) + b * (ys + 0.5) + c  # continuous coordinates, as PIL tests them
  y_in = d * (xs + 0.5) + e * (ys + 0.5) + f
  inside = ((x_in >= 0) & (x_in < tf.cast(width, tf.float32))
            & (y_in >= 0) & (y_in < tf.cast(height, tf.float32)))[..., None]
  fill_value = tf.constant(_fill_pixel(fill, image.shape[-1]), tf.float32)
  out = tf.where(inside, tf.floor(sampled), fill_value)  # PIL truncates
  return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def rotate(image: tf.Tensor, degrees: tf.Tensor, fill: Sequence[int]) -> tf.Tensor:
  """PIL's image.rotate(degrees): counter-clockwise about (W / 2, H / 2), same size."""
  shape = tf.cast(tf.shape(image), tf.float32)
  cx, cy = shape[1] / 2.0, shape[0] / 2.0
  angle = -tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  a, b, d, e = tf.cos(angle), tf.sin(angle), -tf.sin(angle), tf.cos(angle)
  c = a * -cx + b * -cy + cx
  f = d * -cx + e * -cy + cy
  return affine(image, (a, b, c, d, e, f), fill)


def shear_x(image, factor, fill):
  """PIL's affine (1, factor, 0, 0, 1, 0)."""
  return affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(image, factor, fill):
  """PIL's affine (1, 0, 0, factor, 1, 0)."""
  return affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill)


def translate_x(image, fraction, fill):
  """Shift by fraction * width pixels (PIL's affine (1, 0, fraction * W, 0, 1, 0))."""
  pixels = fraction * tf.cast(tf.shape(image)[1], tf.float32)
  return affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill)


def translate_y(image, fraction, fill):
  """Shift by fraction * height pixels (PIL's affine (1, 0, 0, 0, 1, fraction * H))."""
  pixels = fraction * tf.cast(tf.shape(image)[0], tf.float32)
  return affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill)


# ----------------------------------------------------------------------------------------------
# timm's level -> argument maps, and one op by index.

def _level(magnitude):
  return tf.cast(magnitude, tf.float32) / MAX_LEVEL


def _enhance_factor(magnitude, sign):
  return tf.maximum(0.1, 1.0 + sign * _level(magnitude) * 0.9)


def apply_op(image: tf.Tensor, op: str | tf.Tensor, magnitude, sign=1.0,
             fill: Sequence[int] = IMAGENET_FILL) -> tf.Tensor:
  """Applies one op to uint8 [H, W, C] at `magnitude` (float in [0, 10]) with `sign` (+-1).

  `op` is a name from `OPS` or an int32 index into it (a tensor: dispatched with switch_case).
  """
  magnitude = tf.cast(magnitude, tf.float32)
  sign = tf.cast(sign, tf.float32)
  level = _level(magnitude)
  to_int = lambda v: tf.cast(tf.floor(v), tf.int32)
  branches = {
      "AutoContrast": lambda: auto_contrast(image),
      "Equalize": lambda: equalize(image),
      "Invert": lambda: invert(image),
      "Rotate": lambda: rotate(image, sign * level * 30.0, fill),
      "PosterizeIncreasing": lambda: posterize(image, 4 - to_int(level * 4.0)),
      "SolarizeIncreasing": lambda: solarize(image, 256 - to_int(level * 256.0)),
      "SolarizeAdd": lambda: solarize_add(image, to_int(level * 110.0)),
      "ColorIncreasing": lambda: color(image, _enhance_factor(magnitude, sign)),
      "ContrastIncreasing": lambda: contrast(image, _enhance_factor(magnitude, sign)),
      "BrightnessIncreasing": lambda: brightness(image, _enhance_factor(magnitude, sign)),
      "SharpnessIncreasing": lambda: sharpness(image, _enhance_factor(magnitude, sign)),
      "ShearX": lambda: shear_x(image, sign * level * 0.3, fill),
      "ShearY": lambda: shear_y(image, sign * level * 0.3, fill),
      "TranslateXRel": lambda: translate_x(image, sign * level * 0.45, fill),
      "TranslateYRel": lambda: translate_y(image, sign * level * 0.45, fill),
  }
  if isinstance(op, str):
    if op not in branches:
      raise ValueError(f"unknown RandAugment op {op!r}: allowed {list(OPS)}")
    return branches[op]()
  out = tf.switch_case(tf.cast(op, tf.int32), [branches[name] for name in OPS])
  return tf.ensure_shape(out, image.shape)


def check_settings(num_ops, magnitude, magnitude_std, prob, fill=IMAGENET_FILL) -> None:
  """ValueError (one line) for a bad RandAugment setting."""
  if not isinstance(num_ops, int) or num_ops < 0:
    raise ValueError(f"config.data.randaugment.num_ops must be an integer >= 0 (0 = off), got "
                     f"{num_ops!r}")
  if not 0 <= magnitude <= MAX_LEVEL:
    raise ValueError(f"config.data.randaugment.magnitude={magnitude} is outside [0, {MAX_LEVEL:g}]")
  if not magnitude_std >= 0:
    raise ValueError(f"config.data.randaugment.magnitude_std={magnitude_std} must be >= 0")
  if not 0 <= prob <= 1:
    raise ValueError(f"config.data.randaugment.prob={prob} is outside [0, 1]")
  fill = tuple(fill)
  if len(fill) not in (1, 3) or any(not 0 <= int(v) <= 255 or int(v) != v for v in fill):
    raise ValueError(f"config.data.randaugment.fill={fill} must be 1 or 3 integers in [0, 255]")


def randaugment(image: tf.Tensor, seed: tf.Tensor, *, num_ops: int = 2, magnitude: float = 9.0,
                magnitude_std: float = 0.5, prob: float = 0.5,
                fill: Sequence[int] = IMAGENET_FILL) -> tf.Tensor:
  """timm's RandAugment on one uint8 image [H, W, C] (static shape), keyed by `seed` [2] int.

  For each of `num_ops` slots: an op drawn uniformly from `OPS` (with replacement), applied with
  probability `prob`, at magnitude clip(N(magnitude, magnitude_std), 0, 10), with a random sign
  (-1 with probability 1/2, where the op takes one). Returns uint8 [H, W, C].
  """
  seed = tf.cast(seed, tf.int64)
  for slot_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_ops)):
    op_seed, apply_seed, magnitude_seed, sign_seed = tf.unstack(
        tf.random.experimental.stateless_split(slot_seed, 4))
    op = tf.random.stateless_uniform([], op_seed, 0, len(OPS), dtype=tf.int32)
    apply = tf.random.stateless_uniform([], apply_seed) < prob
    m = magnitude + magnitude_std * tf.random.stateless_normal([], magnitude_seed)
    m = tf.clip_by_value(m, 0.0, MAX_LEVEL)
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) > 0.5, -1.0, 1.0)
    image = tf.cond(apply, lambda im=image, o=op, mm=m, s=sign: apply_op(im, o, mm, s, fill),
                    lambda im=image: im)
  return image
