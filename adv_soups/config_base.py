"""The config schema under its earlier name: `base_config` lives in `adv_soups.training.config`
(config files written before the `training/` package import it from here)."""
from adv_soups.training.config import base_config

__all__ = ["base_config"]
