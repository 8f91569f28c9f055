"""Reconstruction evaluation: protocol presets, robust file reading, the batched/distributed runner and reports.

Example:
    >>> from dualvitok.evaluation import Evaluator, get_protocol, scan_folder, write_reports  # doctest: +SKIP
    >>> result = Evaluator(model, get_protocol("imagenet256"), ["psnr", "ssim", "usage"]).run(scan_folder("val/"))
"""

from .data import Sample, read_sample, scan_folder
from .protocols import PROTOCOLS, EvaluationProtocol, get_protocol
from .report import markdown_table, write_reports
from .runner import ALL_METRICS, DEFAULT_METRICS, EvaluationResult, Evaluator

__all__ = [
    "ALL_METRICS",
    "DEFAULT_METRICS",
    "PROTOCOLS",
    "EvaluationProtocol",
    "EvaluationResult",
    "Evaluator",
    "Sample",
    "get_protocol",
    "markdown_table",
    "read_sample",
    "scan_folder",
    "write_reports",
]
