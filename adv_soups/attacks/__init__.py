"""Adversarial attacks: PGD (l_inf, l_2), APGD-CE / APGD-DLR / APGD-T, FAB-T, Square, the attack
registry and suites (`registry`; `suites` is its old name), and `robust_accuracy`.

All attacks are pure functions of `logits_fn(images) -> logits` and a batch (images float32 NHWC
in [0, 1], eps in pixel units); the gradient attacks differentiate only the input, never the
parameters, and Square differentiates nothing. The submodules keep their names (`attacks.pgd` is
the module); the attack functions are exported as `pgd_attack`, `apgd_attack`, and so on.
"""
from adv_soups.attacks import apgd, checks, fab, losses, pgd, registry, square, suites
from adv_soups.attacks.apgd import checkpoint_schedule
from adv_soups.attacks.losses import (ce_loss, dlr_loss, log_ce_loss, margin_loss, targeted_ce_loss,
                                      targeted_dlr_loss, targeted_margin_loss)
from adv_soups.attacks.pgd import project
from adv_soups.attacks.registry import Attack, register
from adv_soups.attacks.runner import ATTACKS, RobustResult, robust_accuracy

pgd_attack = pgd.pgd
apgd_attack = apgd.apgd
apgd_t_attack = apgd.apgd_t
fab_t_attack = fab.fab_t
square_attack = square.square

__all__ = [
    "ATTACKS", "Attack", "RobustResult", "apgd_attack", "apgd_t_attack", "ce_loss",
    "checkpoint_schedule", "checks", "dlr_loss", "fab_t_attack", "log_ce_loss", "margin_loss",
    "pgd_attack", "project", "register", "registry", "robust_accuracy", "square_attack", "suites",
    "targeted_ce_loss", "targeted_dlr_loss", "targeted_margin_loss",
]
