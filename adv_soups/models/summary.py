"""Parameter counts per adapter: `python -m adv_soups.models.summary --variant=B/16 --num_classes=1000`.

Counts come from `jax.eval_shape` (no memory is allocated), so even H/14 is instant.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from adv_soups import soups
from adv_soups.models import ADAPTERS, create_model

FLAGS = flags.FLAGS
flags.DEFINE_string("variant", "B/16", "Model variant NAME/PATCH, e.g. B/16, S/4, tiny/2.")
flags.DEFINE_integer("num_classes", 1000, "Number of classes.")
flags.DEFINE_integer("image_size", 224, "Input image size (pixels).")
flags.DEFINE_integer("num_domains", 2, "Number of domains (clean, adversarial, ...).")
flags.DEFINE_integer("channels", 3, "Image channels.")


def count_by_adapter(variant: str, num_classes: int, image_size: int, num_domains: int = 2,
                     channels: int = 3) -> dict[str, tuple[int, int]]:
  """{adapter: (total parameters, domain-specific parameters per domain)} for each adapter."""
  counts = {}
  for adapter in ADAPTERS:
    model = create_model(ml_collections.ConfigDict(dict(
        variant=variant, num_classes=num_classes, image_size=image_size, adapter=adapter,
        num_domains=num_domains)))
    images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    domain = jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(lambda x, d: model.init(jax.random.key(0), x, d), images, domain)
    counts[adapter] = soups.count_params(shapes["params"])
  return counts


def format_table(counts: dict[str, tuple[int, int]], title: str) -> str:
  """A text table: adapter, total, domain-specific per domain, ratio to the token adapter."""
  token = counts["token"][1]
  lines = [title, f"{'adapter':<8} {'total params':>14} {'per-domain params':>18} {'x token':>8}"]
  for adapter, (total, per_domain) in counts.items():
    ratio = f"{per_domain / token:.1f}" if per_domain else "-"
    lines.append(f"{adapter:<8} {total:>14,} {per_domain:>18,} {ratio:>8}")
  lines.append("per-domain params: the size of one domain's copy of the domain-specific parameters "
               "(token: the class token; norm: scale and bias of every LayerNorm; head: the "
               "classifier). 'x token' = that size / the token's; a norm adapter with ratio R has "
               "R - 1 times more domain-specific parameters than the token adapter.")
  return "\n".join(lines)


def main(argv):
  del argv
  try:
    counts = count_by_adapter(FLAGS.variant, FLAGS.num_classes, FLAGS.image_size,
                              FLAGS.num_domains, FLAGS.channels)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_table(counts, f"ViT-{FLAGS.variant}, {FLAGS.num_classes} classes, "
                     f"{FLAGS.image_size}px, {FLAGS.num_domains} domains"))


if __name__ == "__main__":
  app.run(main)
