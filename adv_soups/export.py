"""Export a soup as a plain single-domain ViT checkpoint (vision_transformer .npz layout).

  python -m adv_soups.export --workdir=DIR --alpha=A --out=soup.npz [--step=CKPT]

Writes `soup.npz` (the soup at alpha A of the workdir's checkpoint, in the vision_transformer key
layout: the soup's class token as `cls`, its norms / head where the adapter owns them) and
`soup.json` beside it: the input normalisation, resolution, patch size, classes and where the soup
came from. Our model normalises inside with config.model.mean / std; timm, big_vision and
RobustBench load these files expecting that done outside: feed them (x - mean) / std for images x
in [0, 1]. `model.init_from=soup.npz` loads the file back (the sidecar's normalisation is checked).
Bad flags, alpha or workdir: one line, exit 2, nothing written.
"""
from __future__ import annotations

import os

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads

import json
import sys
from typing import Any

from etils import epath
from absl import flags

from adv_soups import cli
from adv_soups.models import npz as npz_lib

_FLAGS = (
    ("string", "workdir", None, "Training workdir (config.json + checkpoints)."),
    ("string", "alpha", None, "Soup coefficient in [0, 1]: 0 = clean mode, 1 = robust mode."),
    ("string", "out", None, "Output .npz path (any etils.epath path); the sidecar is OUT.json."),
    ("integer", "step", None, "Checkpoint step (default: the latest)."),
)


def _flag_values(specs) -> flags.FlagValues:
  """A fresh FlagValues holding `specs`, so main() can run more than once in one process."""
  values = flags.FlagValues()
  for kind, name, default, help_text in specs:
    getattr(flags, f"DEFINE_{kind}")(name, default, help_text, flag_values=values)
  return values


def sidecar(loaded: Any, alpha: float) -> dict[str, Any]:
  """The JSON sidecar of the soup at `alpha` of a `LoadedModel`: what a reader of the .npz needs
  to feed it (normalisation, resolution) and to know what it is."""
  model_cfg = loaded.config.model
  model = loaded.model
  channels = loaded.image_shape[-1]
  broadcast = lambda v: [float(x) for x in (list(v) * channels if len(v) == 1 else v)]
  return {
      "format": "google-research/vision_transformer .npz (classifier token)",
      "input": "float32 NHWC images x in [0, 1], fed as (x - mean) / std",
      "mean": broadcast(model_cfg.mean), "std": broadcast(model_cfg.std),
      "image_size": int(model_cfg.image_size), "channels": int(channels),
      "patch_size": int(model.patch_size), "width": int(model.width), "depth": int(model.depth),
      "num_heads": int(model.num_heads), "mlp_dim": int(model.mlp_dim),
      "num_classes": int(model_cfg.num_classes), "gelu": "exact (erf)", "layernorm_epsilon": 1e-6,
      "alpha": alpha, "adapter": str(model_cfg.adapter), "workdir": loaded.workdir,
      "step": int(loaded.step), "params": loaded.params_item,
  }


def export_soup(workdir: str, alpha: float, out: str, step: int | None = None) -> dict[str, Any]:
  """Writes the soup at `alpha` of `workdir` to `out` (.npz) and its sidecar; returns the sidecar.

  Everything is checked before anything is written: ValueError / FileNotFoundError (one line) for
  a bad alpha (outside [0, 1], or not 0 for a single-domain run), workdir, step or out path.
  """
  from adv_soups import loading  # local: flag errors need no jax
  if not str(out).endswith(".npz"):
    raise ValueError(f"--out={out!r} must end with .npz")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"--alpha={alpha} is outside [0, 1] (0 = clean mode, 1 = robust mode)")
  parent = os.path.dirname(out)
  if parent and not epath.Path(parent).is_dir():
    raise ValueError(f"--out={out!r}: directory {parent!r} does not exist")
  loaded = loading.load(workdir, step)
  _, params = loaded.soup(alpha)
  arrays = npz_lib.export_arrays(params)
  meta = sidecar(loaded, alpha)
  npz_lib.write_npz(out, arrays)
  with epath.Path(npz_lib.sidecar_path(out)).open("w") as f:
    json.dump(meta, f, indent=2)
  return meta


def main(argv: list[str] | None = None) -> None:
  """`python -m adv_soups.export`: one line and exit 2 on bad input, else writes the files."""
  values = _flag_values(_FLAGS)
  cli.parse_flags(argv, values)
  for name in ("workdir", "alpha", "out"):
    if not values[name].value:
      cli.fail(f"--{name} is required (usage: --workdir=DIR --alpha=A --out=soup.npz)")
  try:
    alpha = cli.parse_number(values.alpha, "--alpha")
    meta = export_soup(values.workdir, alpha, values.out, values.step)
  except (ValueError, FileNotFoundError) as e:
    cli.fail(str(e))
  print(f"wrote {values.out} and {npz_lib.sidecar_path(values.out)}: soup at alpha {alpha} of "
        f"{values.workdir} (step {meta['step']}), {meta['image_size']}px, {meta['num_classes']} "
        f"classes; feed (x - mean) / std with mean={meta['mean']} std={meta['std']}",
        file=sys.stdout)


if __name__ == "__main__":
  main()
