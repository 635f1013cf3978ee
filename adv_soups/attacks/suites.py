"""Old name of the attack registry (`adv_soups.attacks.registry`), kept so callers need not
change their imports: every name here is the registry's own object."""
from __future__ import annotations

from adv_soups.attacks.registry import (ATTACKS, NUM_TARGETS, STANDARD_AUTOATTACK, SUITES,  # noqa: F401
                                        WHITE_BOX_CORE, Attack, allowed_text, describe, display,
                                        get, is_reference, parse_suite, register,
                                        resolve_budgets, resolve_steps, suite_label)
