"""Model construction from an ml_collections config: `create_model(config.model)`."""
from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp

from adv_soups.models.vit import ADAPTERS, ViT

# name: (width, depth, heads, mlp_dim), as in the ViT paper; `tiny` is for tests and the digits demo.
SIZES = {
    "tiny": (32, 2, 2, 64),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_OVERRIDES = ("width", "depth", "num_heads", "mlp_dim")


def parse_variant(variant: str) -> tuple[str, int]:
  """'B/16' -> ('B', 16). Raises ValueError naming the variant and the allowed form."""
  match = re.fullmatch(r"([A-Za-z]+)/(\d+)", str(variant))
  if not match or match.group(1) not in SIZES or int(match.group(2)) < 1:
    raise ValueError(f"unknown model variant {variant!r}: expected NAME/PATCH with NAME in "
                     f"{sorted(SIZES)} and PATCH a positive integer, e.g. 'B/16'")
  return match.group(1), int(match.group(2))


def _get(config: Any, name: str, default: Any = None) -> Any:
  value = config.get(name, default)  # ConfigDict and dict alike
  return default if value is None else value


def create_model(config: Any) -> ViT:
  """Builds the ViT from a ConfigDict (or dict) with `variant`, `num_classes` and `image_size`;
  optional (absent = the config schema's default, a test checks they agree): `adapter`,
  `num_domains`, `patch_size`, `width`, `depth`, `num_heads`, `mlp_dim` (override the variant),
  `mean`, `std`, `dropout_rate`, `drop_path_rate`, `dtype` ('float32' or 'bfloat16': the compute
  dtype; parameters stay float32), `remat` (checkpoint each block's activations). Bad values raise
  ValueError naming the value and the choices.
  """
  for key in ("variant", "image_size"):  # no defaults here: the config schema holds them
    if _get(config, key) is None:
      raise ValueError(f"model {key} is required (e.g. 'B/16' and 224; see training/config.py)")
  name, patch = parse_variant(_get(config, "variant"))
  width, depth, heads, mlp = (_get(config, k, d) for k, d in zip(_OVERRIDES, SIZES[name]))
  patch = _get(config, "patch_size", patch)
  adapter = _get(config, "adapter", "token")
  if adapter not in ADAPTERS:
    raise ValueError(f"unknown adapter {adapter!r}: allowed {list(ADAPTERS)}")
  num_domains = _get(config, "num_domains", 2)
  if not isinstance(num_domains, int) or num_domains < 1:
    raise ValueError(f"num_domains must be an integer >= 1, got {num_domains!r}")
  num_classes = _get(config, "num_classes")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
  image_size = _get(config, "image_size")
  if not isinstance(image_size, int) or image_size < patch or image_size % patch:
    raise ValueError(f"image_size {image_size!r} must be a positive multiple of the patch size "
                     f"{patch}")
  for key, value in (("width", width), ("depth", depth), ("num_heads", heads), ("mlp_dim", mlp)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"model {key} must be an integer >= 1, got {value!r}")
  if width % heads:
    raise ValueError(f"width {width} is not divisible by num_heads {heads}")
  dtype = _get(config, "dtype", "float32")
  if dtype not in DTYPES:
    raise ValueError(f"unknown model dtype {dtype!r}: allowed {sorted(DTYPES)}")
  for key in ("dropout_rate", "drop_path_rate"):
    rate = _get(config, key, 0.0)
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"{key} must be in [0, 1), got {rate!r}")
  return ViT(
      num_classes=num_classes, patch_size=patch, width=width, depth=depth, num_heads=heads,
      mlp_dim=mlp, image_size=image_size, adapter=adapter, num_domains=num_domains,
      mean=tuple(_get(config, "mean", (0.5,))), std=tuple(_get(config, "std", (0.5,))),
      dropout_rate=_get(config, "dropout_rate", 0.0),
      drop_path_rate=_get(config, "drop_path_rate", 0.0), dtype=DTYPES[dtype],
      remat=bool(_get(config, "remat", False)))


def init_params(model: ViT, rng: Any, channels: int = 3) -> Any:
  """The model's initial parameters for images [1, image_size, image_size, channels]."""
  images = jnp.zeros((1, model.image_size, model.image_size, channels), jnp.float32)
  return model.init(rng, images, jnp.zeros((1,), jnp.int32), train=False)["params"]


__all__ = ["ADAPTERS", "SIZES", "ViT", "create_model", "init_params", "parse_variant"]
