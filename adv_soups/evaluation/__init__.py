"""The one evaluation engine behind training, `evaluate`, `sweep`, `load()` and the experiments.

  requests.make_request(workdir, attack=..., alphas=[...] | domain=D, ...) -> Request  (checks)
  run.run_request(request, kind='eval' | 'sweep') -> report (and files named by the settings)
  engine.evaluate_request(request[, dataset, split, num_examples]) -> per-example results
      (the one entry point: class subset, rows per call, process offset and gather inside)
  engine.evaluate_columns(model, params, batches, columns, attacks=...) -> per-example results
  periodic.evaluate(config, model, params, step)  (config.evals, during training)
"""
from adv_soups.evaluation import engine, periodic, reports, requests, run
from adv_soups.evaluation.engine import (ColumnResult, evaluate_columns, evaluate_request,
                                         model_logits_fn)
from adv_soups.evaluation.requests import Request, make_request
from adv_soups.evaluation.run import run_request

__all__ = ["ColumnResult", "Request", "engine", "evaluate_columns", "evaluate_request",
           "make_request", "model_logits_fn", "periodic", "reports", "requests", "run", "run_request"]
