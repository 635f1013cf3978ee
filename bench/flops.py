"""Analytic FLOP count of the ViT train step (multiply-adds count 2 FLOPs; matmuls only).

Forward pass of one image, ViT with width W, depth L, MLP M, N = (S / P)^2 patches + 1 class token:
  patch embedding   2 * (N - 1) * P^2 * C * W
  per block         2 * N * W * 3W   (q, k, v)      + 2 * N * N * W (scores) + 2 * N * N * W (AV)
                  + 2 * N * W * W    (out)          + 2 * 2 * N * W * M (MLP)
  head              2 * W * K
Elementwise work (LayerNorm, GELU, softmax, adds) is left out: it is a few % of the matmul FLOPs.
A backward pass w.r.t. the input only (the attack's) is ~1 forward; w.r.t. input and parameters
(training) ~2 forwards. So per image, in forward-equivalents: clean 3, PGD-k adversarial-only
2k + 3, PGD-k co-training 2k + 6 (the clean and the adversarial copy trained, k attack passes).
XLA's cost analysis counts a `fori_loop` body once, so it undercounts the attack: use it only to
cross-check one forward pass.
"""
from __future__ import annotations

MODES = ("clean", "adversarial", "cotrain")


def forward_flops(*, image_size: int, patch_size: int, channels: int, width: int, depth: int,
                  mlp_dim: int, num_classes: int) -> int:
  """FLOPs of one forward pass of one image (matmuls and the patch-embedding conv)."""
  patches = (image_size // patch_size) ** 2
  tokens = patches + 1
  embed = 2 * patches * patch_size * patch_size * channels * width
  block = (2 * tokens * width * 3 * width + 2 * 2 * tokens * tokens * width
           + 2 * tokens * width * width + 2 * 2 * tokens * width * mlp_dim)
  return embed + depth * block + 2 * width * num_classes


def forward_equivalents(mode: str, attack_steps: int) -> int:
  """Forward passes per image drawn from the data: clean 3, adversarial 2k + 3, cotrain 2k + 6."""
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}: allowed {list(MODES)}")
  if mode == "clean":
    return 3
  return 2 * attack_steps + (3 if mode == "adversarial" else 6)


def step_flops_per_image(mode: str, attack_steps: int, **model) -> int:
  """FLOPs per image of one train step in `mode` (model: the keyword arguments of forward_flops)."""
  return forward_equivalents(mode, attack_steps) * forward_flops(**model)


IMAGENET_TRAIN_IMAGES = 1_281_167
# Dense bf16 peak FLOP/s per chip from the vendors' data sheets (estimates' denominators only).
PEAK_BF16 = {"TPU v4": 275e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "H100 SXM": 989e12}
VIT_B16 = dict(image_size=224, patch_size=16, channels=3, width=768, depth=12, mlp_dim=3072,
               num_classes=1000)


def device_hours_per_epoch(flops_per_image: float, peak_flops: float, utilisation: float,
                           images: int = IMAGENET_TRAIN_IMAGES) -> float:
  """Device-hours for one epoch of `images` at `utilisation` of a `peak_flops` (FLOP/s) device."""
  return images * flops_per_image / (peak_flops * utilisation) / 3600


def cost_table(cpu_peak: float | None = None, cpu_utilisation: float | None = None,
               mfu: float = 0.45, attack_steps: int = 2) -> list[str]:
  """Text lines: FLOPs per image of ViT-B/16 224px PGD-k co-training and device-hours per epoch."""
  per_image = step_flops_per_image("cotrain", attack_steps, **VIT_B16)
  lines = [f"ViT-B/16 224px PGD-{attack_steps} co-training: "
           f"{forward_flops(**VIT_B16) / 1e9:.2f} GFLOP forward, "
           f"{per_image / 1e9:.1f} GFLOP per image, "
           f"{per_image * IMAGENET_TRAIN_IMAGES:.3g} FLOP per ImageNet epoch"]
  if cpu_peak and cpu_utilisation:
    hours = device_hours_per_epoch(per_image, cpu_peak, cpu_utilisation)
    lines.append(f"measured CPU ({cpu_peak / 1e9:.0f} GFLOP/s f32 matmul, utilisation "
                 f"{cpu_utilisation:.2f}): {hours:,.0f} machine-hours per epoch")
  for name, peak in PEAK_BF16.items():
    lines.append(f"{name} (estimate: {peak / 1e12:.0f} TFLOP/s bf16 peak, {mfu:.0%} MFU assumed): "
                 f"{device_hours_per_epoch(per_image, peak, mfu):.2f} chip-hours per epoch")
  return lines


if __name__ == "__main__":
  std = dict(image_size=32, patch_size=4, channels=3, width=192, depth=6, mlp_dim=768,
             num_classes=10)
  for name, m in (("standard", std), ("ViT-B/16 224px", VIT_B16)):
    print(f"{name}: forward {forward_flops(**m) / 1e9:.3f} GFLOP/image; PGD-2 cotrain "
          f"{step_flops_per_image('cotrain', 2, **m) / 1e9:.2f} GFLOP/image")
  import sys
  cpu = [float(v) for v in sys.argv[1:3]]  # optional: measured peak GFLOP/s and utilisation
  print("\n".join(cost_table(cpu[0] * 1e9 if cpu else None, cpu[1] if cpu else None)))
