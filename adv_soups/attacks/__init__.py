"""Adversarial attacks: PGD (l_inf, l_2), APGD-CE / APGD-DLR / APGD-T, and `robust_accuracy`.

All attacks are pure functions of `logits_fn(images) -> logits` and a batch (images float32 NHWC
in [0, 1], eps in pixel units); they differentiate only the input, never the parameters.
"""
from adv_soups.attacks.apgd import apgd, apgd_t, checkpoint_schedule
from adv_soups.attacks.losses import (ce_loss, dlr_loss, log_ce_loss, margin_loss, targeted_ce_loss,
                                      targeted_dlr_loss, targeted_margin_loss)
from adv_soups.attacks.pgd import pgd, project
from adv_soups.attacks.runner import ATTACKS, RobustResult, robust_accuracy

__all__ = [
    "ATTACKS", "RobustResult", "apgd", "apgd_t", "ce_loss", "checkpoint_schedule", "dlr_loss",
    "log_ce_loss",
    "margin_loss", "pgd", "project", "robust_accuracy", "targeted_ce_loss", "targeted_dlr_loss",
    "targeted_margin_loss",
]
