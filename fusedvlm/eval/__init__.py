"""Benchmark evaluation across n_l with each image's vision prefix computed once
(``fusedvlm eval``): VLMEvalKit TSV benchmarks in, per-item predictions, official metrics and a
scores CSV for ``fusedvlm fit-scaling`` out."""

from fusedvlm.eval.data import Benchmark, BenchmarkError, Item, load_benchmark
from fusedvlm.eval.runner import EvalConfig, Evaluator, PredictionStore

__all__ = ["Benchmark", "BenchmarkError", "EvalConfig", "Evaluator", "Item", "PredictionStore", "load_benchmark"]
