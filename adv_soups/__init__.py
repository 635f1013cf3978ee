"""adv_soups: clean/adversarial co-training of ViTs with domain adapters, and adapter soups."""
__version__ = "0.1.0"
