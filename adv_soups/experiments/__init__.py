"""Experiments that reproduce the paper's figures from the library (training + evaluation engine).

  python -m adv_soups.experiments.adapters --config=configs/digits.py --workdir=DIR
"""
