"""RandAugment (timm's rand-m9-mstd0.5-inc1) in tf.data: each op's known result, PIL agreement,
shapes and dtypes, statelessness, and its place in the training pipeline."""
import numpy as np
import pytest
import tensorflow as tf

from adv_soups import data as data_lib
from adv_soups.data import randaugment as ra

FILL = ra.IMAGENET_FILL


def _image(channels, height=12, width=10, seed=0):
  rng = np.random.default_rng(seed)
  img = rng.integers(20, 230, (height, width, channels), dtype=np.uint8)
  img[0, 0] = 7    # a distinct minimum and maximum per channel
  img[-1, -1] = 250
  return img


def _op(img, name, magnitude, sign=1.0):
  return ra.apply_op(tf.constant(img), name, magnitude, sign, FILL).numpy()


def _np_equalize(channel):
  """PIL's ImageOps.equalize for one uint8 channel, written out with Python loops."""
  hist = [int((channel == v).sum()) for v in range(256)]
  present = [h for h in hist if h]
  step = (sum(present) - present[-1]) // 255
  if step == 0:
    return channel.copy()
  lut, n = [], step // 2
  for v in range(256):
    lut.append(min(n // step, 255))
    n += hist[v]
  return np.array(lut, np.uint8)[channel]


def _np_autocontrast(channel):
  lo, hi = int(channel.min()), int(channel.max())
  scale = 255.0 / (hi - lo)
  lut = [min(max(int(v * scale - lo * scale), 0), 255) for v in range(256)]
  return np.array(lut, np.uint8)[channel]


# timm's ops at magnitude 0: four of them are not the identity.
MAGNITUDE_0 = {
    "AutoContrast": lambda x: np.stack([_np_autocontrast(x[..., c]) for c in range(x.shape[-1])], -1),
    "Equalize": lambda x: np.stack([_np_equalize(x[..., c]) for c in range(x.shape[-1])], -1),
    "Invert": lambda x: 255 - x,
    "PosterizeIncreasing": lambda x: x & 0xF0,  # keeps 4 bits at magnitude 0
}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ra.OPS)
def test_each_op_at_magnitude_0_gives_timms_result(name, channels):
  img = _image(channels)
  expected = MAGNITUDE_0.get(name, lambda x: x)(img)
  for sign in (1.0, -1.0):
    np.testing.assert_array_equal(_op(img, name, 0.0, sign), expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_solarize_posterize_equalize_exact(channels):
  img = _image(channels, 16, 16, seed=1)
  x = img.astype(np.int32)
  # magnitude 9: solarize threshold 256 - int(0.9 * 256) = 26, posterize keeps 4 - int(3.6) = 1 bit
  np.testing.assert_array_equal(_op(img, "SolarizeIncreasing", 9.0),
                                np.where(x < 26, x, 255 - x).astype(np.uint8))
  np.testing.assert_array_equal(_op(img, "PosterizeIncreasing", 9.0), img & 0x80)
  np.testing.assert_array_equal(_op(img, "PosterizeIncreasing", 10.0), np.zeros_like(img))
  np.testing.assert_array_equal(_op(img, "SolarizeAdd", 5.0),  # + int(0.5 * 110) below 128
                                np.where(x < 128, np.minimum(x + 55, 255), x).astype(np.uint8))
  skewed = (img // 4).astype(np.uint8)  # a narrow histogram that equalisation spreads out
  np.testing.assert_array_equal(
      _op(skewed, "Equalize", 5.0),
      np.stack([_np_equalize(skewed[..., c]) for c in range(channels)], -1))


def test_integer_translation_shifts_and_fills_with_the_mean_pixel():
  img = _image(3, 8, 8)
  out = ra.translate_x(tf.constant(img), 0.25, FILL).numpy()  # 2 px: output x reads input x + 2
  np.testing.assert_array_equal(out[:, :6], img[:, 2:])
  np.testing.assert_array_equal(out[:, 6:], np.broadcast_to(np.array(FILL, np.uint8), (8, 2, 3)))
  grey = ra.translate_y(tf.constant(img[..., :1]), -0.25, FILL).numpy()  # 1 channel: grey fill
  np.testing.assert_array_equal(grey[2:], img[:6, :, :1])
  assert (grey[:2] == 117).all()  # PIL's L of (124, 116, 104)


@pytest.mark.parametrize("channels", [1, 3])
def test_ops_agree_with_pil(channels):
  """timm applies these ops through PIL; ours agree to 1 grey level on a few pixels (float32 vs
  PIL's float64 coordinates and blends)."""
  pytest.importorskip("PIL")
  from PIL import Image, ImageEnhance, ImageOps
  img = _image(channels, 23, 31, seed=2)
  im = Image.fromarray(img[..., 0] if channels == 1 else img)
  fill = FILL if channels == 3 else 117
  kw = dict(resample=Image.BILINEAR, fillcolor=fill)
  enhancers = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
               "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}
  for m, sign in ((3.3, 1.0), (9.0, -1.0), (9.0, 1.0)):
    level = m / 10
    w, h = im.size
    ref = {
        "Rotate": im.rotate(sign * level * 30, **kw),
        "ShearX": im.transform(im.size, Image.AFFINE, (1, sign * level * .3, 0, 0, 1, 0), **kw),
        "ShearY": im.transform(im.size, Image.AFFINE, (1, 0, 0, sign * level * .3, 1, 0), **kw),
        "TranslateXRel": im.transform(im.size, Image.AFFINE,
                                      (1, 0, sign * level * .45 * w, 0, 1, 0), **kw),
        "TranslateYRel": im.transform(im.size, Image.AFFINE,
                                      (1, 0, 0, 0, 1, sign * level * .45 * h), **kw),
        "AutoContrast": ImageOps.autocontrast(im), "Equalize": ImageOps.equalize(im),
        "SolarizeIncreasing": ImageOps.solarize(im, 256 - int(level * 256)),
    }
    for name, cls in enhancers.items():
      ref[name + "Increasing"] = cls(im).enhance(max(0.1, 1 + sign * level * 0.9))
    for name, expected in ref.items():
      expected = np.asarray(expected).reshape(img.shape).astype(int)
      diff = np.abs(_op(img, name, m, sign).astype(int) - expected)
      assert diff.max() <= 1 and (diff > 0).mean() < 0.02, (name, m, sign, diff.max())


@pytest.mark.parametrize("shape", [(8, 8, 1), (3, 5, 3), (32, 32, 3)])
def test_randaugment_keeps_shape_and_dtype_and_changes_images(shape):
  rng = np.random.default_rng(3)
  img = tf.constant(rng.integers(0, 256, shape, dtype=np.uint8))
  fn = tf.function(lambda im, s: ra.randaugment(im, s, num_ops=2, magnitude=10.0,
                                                magnitude_std=0.5, prob=1.0))
  changed = 0
  for position in range(20):
    out = fn(img, tf.constant([0, position], tf.int64))
    assert out.shape == shape and out.dtype == tf.uint8
    changed += int(not np.array_equal(out.numpy(), img.numpy()))
  assert changed >= 15  # two ops always applied at magnitude ~10: most images change


def test_same_seed_same_image_other_position_other_image():
  img = tf.constant(_image(3, 16, 16))
  fn = tf.function(lambda s: ra.randaugment(img, s))
  a = fn(tf.constant([5, 1], tf.int64)).numpy()
  np.testing.assert_array_equal(a, fn(tf.constant([5, 1], tf.int64)).numpy())
  outputs = [fn(tf.constant([5, p], tf.int64)).numpy() for p in range(2, 12)]
  assert sum(not np.array_equal(a, o) for o in outputs) >= 5


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="magnitude"):
    ra.check_settings(2, 11.0, 0.5, 0.5)
  with pytest.raises(ValueError, match="num_ops"):
    ra.check_settings(-1, 9.0, 0.5, 0.5)
  with pytest.raises(ValueError, match="fill"):
    ra.check_settings(2, 9.0, 0.5, 0.5, (1, 2))


def test_pipeline_applies_randaugment_statelessly(tmp_path):
  """The digits pipeline with RandAugment: the same seed gives the same batches, and they differ
  from the pipeline without it (whose batches RandAugment leaves unchanged when off)."""
  settings = dict(num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5, fill=(124, 116, 104))
  def batches(randaugment, n=2):
    config = {"name": "digits", "data_dir": str(tmp_path), "shuffle_buffer": 64,
              "randaugment": randaugment}
    it = data_lib.train_iterator(config, global_batch_size=32, seed=0)
    return [next(it)["image"] for _ in range(n)]
  on, again = batches(settings), batches(settings)
  off, zero = batches(None), batches(dict(settings, num_ops=0))
  for a, b, c, d in zip(on, again, off, zero):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(c, d)
    assert a.shape == c.shape and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert 0 < np.mean(np.any(a != c, axis=(1, 2, 3))) < 1  # some images changed, not all
