"""Export a soup as a plain single-domain ViT: vision_transformer .npz, or timm safetensors.

  python -m adv_soups.export --workdir=DIR --alpha=A --out=soup.npz [--step=CKPT]
  python -m adv_soups.export --workdir=DIR --alpha=A --format=timm --out=OUTDIR

`--format=timm` writes OUTDIR/model.safetensors (timm's parameter names and layouts, see
`models/timm_layout.py`; written with safetensors' numpy API, no torch), OUTDIR/config.json (timm's
Hub config: `timm.create_model("local-dir:OUTDIR", pretrained=True)` loads it, and so does the Hub
once uploaded) and OUTDIR/README.md (a model card: alpha, threat model, and the clean / robust
accuracy of the workdir's latest report on that soup, if any). timm normalises with the config's
mean / std through `timm.data.resolve_data_config`, so feed it images in [0, 1] transformed as
timm does.

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
    ("string", "out", None, "npz: output .npz path (any etils.epath path), the sidecar is "
     "OUT.json; timm: an output directory (created; files in it are replaced)."),
    ("integer", "step", None, "Checkpoint step (default: the latest)."),
    ("string", "format", "npz", "npz (google-research/vision_transformer layout) or timm "
     "(model.safetensors + config.json + README.md)."),
)
FORMATS = ("npz", "timm")


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


def export_timm(workdir: str, alpha: float, out_dir: str, step: int | None = None
                ) -> dict[str, Any]:
  """Writes the soup at `alpha` of `workdir` as `out_dir`/{model.safetensors, config.json,
  README.md} for timm; returns the sidecar (`sidecar`) plus `files`. Checks as `export_soup`
  (ValueError / FileNotFoundError, one line, nothing written)."""
  from safetensors.numpy import save as save_safetensors
  from adv_soups import loading
  from adv_soups.models import timm_layout
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"--alpha={alpha} is outside [0, 1] (0 = clean mode, 1 = robust mode)")
  if str(out_dir).endswith(".npz"):
    raise ValueError(f"--out={out_dir!r} looks like a file: --format=timm writes a directory")
  if epath.Path(out_dir).exists() and not epath.Path(out_dir).is_dir():
    raise ValueError(f"--out={out_dir!r} exists and is not a directory")
  parent = os.path.dirname(os.path.normpath(out_dir))
  if parent and not epath.Path(parent).is_dir():
    raise ValueError(f"--out={out_dir!r}: directory {parent!r} does not exist")
  loaded = loading.load(workdir, step)
  _, params = loaded.soup(alpha)
  meta = sidecar(loaded, alpha)
  tensors = timm_layout.state_dict(npz_lib.export_arrays(params))
  report = matching_report(workdir, alpha, meta["step"])
  contents = {
      "model.safetensors": save_safetensors(tensors, metadata={"format": "pt"}),
      "config.json": json.dumps(timm_layout.hub_config(meta), indent=2).encode(),
      "README.md": model_card(meta, loaded.config, report).encode(),
  }
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  files = {}
  for name, data in contents.items():
    path = os.path.join(out_dir, name)
    epath.Path(path + ".tmp").write_bytes(data)
    epath.Path(path + ".tmp").replace(path)
    files[name] = path
  return dict(meta, files=files, report=report and report["path"])


def matching_report(workdir: str, alpha: float, step: int) -> dict[str, Any] | None:
  """The newest report in WORKDIR/eval or WORKDIR/sweep with a row at `alpha` for checkpoint
  `step`: {'path', 'clean_accuracy', 'robust_accuracy', 'suite', 'eps', 'norm', 'dataset',
  'split', 'num_examples'}, or None."""
  found = []
  for sub in ("eval", "sweep"):
    for entry in epath.Path(workdir, sub).glob("*.json"):
      path = str(entry)
      try:
        report = json.loads(entry.read_text())
        if report.get("checkpoint_step") != step:
          continue
        for row in report.get("results", []):
          if row.get("alpha") is not None and abs(row["alpha"] - alpha) < 1e-9:
            found.append((entry.stat().mtime, path, report, row))
      except (ValueError, KeyError, TypeError, OSError):
        continue  # a partial or foreign file: not a report
  if not found:
    return None
  _, path, report, row = max(found, key=lambda t: t[0])
  return dict(path=path, clean_accuracy=row["clean_accuracy"],
              robust_accuracy=row.get("robust_accuracy"),
              suite=report["attack"].get("description") or report["attack"].get("suite"),
              eps=report["eps"], norm=report["norm"], dataset=report["dataset"],
              split=report["split"], num_examples=report["num_examples"])


def model_card(meta: dict[str, Any], config: Any, report: dict[str, Any] | None) -> str:
  """The README.md of a timm export (Hugging Face model card, YAML front matter first)."""
  attack = config.attack
  mode = {0.0: " (the clean mode)", 1.0: " (the robust mode)"}.get(float(meta["alpha"]), "")
  lines = ["---", "library_name: timm", "tags:", "- image-classification", "- timm",
           "- adversarial-robustness", "- model-soup", "---", "",
           f"# Adversarial model soup, alpha = {meta['alpha']:g}{mode}", "",
           "A ViT whose domain adapter (the class token, norms or head) is the linear "
           "interpolation `(1 - alpha) * clean + alpha * adversarial` of a model co-trained on "
           "clean and adversarial images (Rebuffi, Croce, Gowal, ICLR 2023), exported by "
           "`adv_soups.export --format=timm`.", "",
           f"- data set: {config.data.name}; {meta['num_classes']} classes; input "
           f"{meta['channels']}x{meta['image_size']}x{meta['image_size']}, pixels in [0, 1] "
           f"normalised with mean {meta['mean']} and std {meta['std']} (timm's data config "
           "does this)",
           f"- ViT: patch {meta['patch_size']}, width {meta['width']}, depth {meta['depth']}, "
           f"{meta['num_heads']} heads, MLP {meta['mlp_dim']}; adapter {meta['adapter']}",
           f"- training threat model: {attack.norm} eps = {attack.eps:g} (pixels in [0, 1]), "
           f"PGD-{attack.num_steps}, mode {config.train.mode}",
           f"- source: checkpoint step {meta['step']} of `{meta['workdir']}`", ""]
  if report is None:
    lines.append("No evaluation report of this soup was found in the workdir: run "
                 "`python -m adv_soups.evaluate --workdir=... --alpha=...` before publishing.")
  else:
    robust = ("-" if report["robust_accuracy"] is None
              else f"{100 * report['robust_accuracy']:.2f}%")
    lines += ["| data | examples | clean accuracy | robust accuracy | attack | threat |",
              "| --- | --- | --- | --- | --- | --- |",
              f"| {report['dataset']} {report['split']} | {report['num_examples']} | "
              f"{100 * report['clean_accuracy']:.2f}% | {robust} | {report['suite']} | "
              f"{report['norm']} eps = {report['eps']:g} |", "",
              f"From `{report['path']}`."]
  lines += ["", "```python", "import timm", "model = timm.create_model(\"local-dir:PATH\", "
            "pretrained=True)  # or \"hf-hub:USER/REPO\"", "```", ""]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  """`python -m adv_soups.export`: one line and exit 2 on bad input, else writes the files."""
  values = _flag_values(_FLAGS)
  cli.parse_flags(argv, values)
  for name in ("workdir", "alpha", "out"):
    if not values[name].value:
      cli.fail(f"--{name} is required (usage: --workdir=DIR --alpha=A --out=soup.npz, or "
               "--format=timm --out=DIR)")
  if values.format not in FORMATS:
    cli.fail(f"--format={values.format!r}: allowed {', '.join(FORMATS)}")
  try:
    alpha = cli.parse_number(values.alpha, "--alpha")
    if values.format == "timm":
      meta = export_timm(values.workdir, alpha, values.out, values.step)
    else:
      meta = export_soup(values.workdir, alpha, values.out, values.step)
  except (ValueError, FileNotFoundError) as e:
    cli.fail(str(e))
  if values.format == "timm":
    print(f"wrote {', '.join(meta['files'].values())}: soup at alpha {alpha} of "
          f"{values.workdir} (step {meta['step']}); load with "
          f"timm.create_model(\"local-dir:{values.out}\", pretrained=True)")
    return
  print(f"wrote {values.out} and {npz_lib.sidecar_path(values.out)}: soup at alpha {alpha} of "
        f"{values.workdir} (step {meta['step']}), {meta['image_size']}px, {meta['num_classes']} "
        f"classes; feed (x - mean) / std with mean={meta['mean']} std={meta['std']}",
        file=sys.stdout)


if __name__ == "__main__":
  main()
