"""Reconstruction evaluation: protocol presets, robust file reading, metric objects, the batched/distributed runner
and reports.

Example:
    >>> from dualvitok.evaluation import EvaluationSettings, Evaluator, get_protocol, scan_folder  # doctest: +SKIP
    >>> settings = EvaluationSettings(get_protocol("imagenet256"), batch_size=32)  # doctest: +SKIP
    >>> result = Evaluator(model, settings, ["psnr", "ssim", "usage"]).run(scan_folder("val/"))  # doctest: +SKIP
"""

from .data import Sample, read_sample, scan_folder
from .metrics import (
    ALL_METRICS,
    DEFAULT_METRICS,
    CodebookUsageMetric,
    EvalBatch,
    EvalMetric,
    FIDMetric,
    LPIPSMetric,
    MetricResult,
    PerImageMean,
    build_metrics,
)
from .protocols import PROTOCOLS, EvaluationProtocol, get_protocol
from .report import EvaluationResult, markdown_table, write_reports
from .runner import EvaluationSettings, Evaluator

__all__ = [
    "ALL_METRICS",
    "DEFAULT_METRICS",
    "PROTOCOLS",
    "CodebookUsageMetric",
    "EvalBatch",
    "EvalMetric",
    "EvaluationProtocol",
    "EvaluationResult",
    "EvaluationSettings",
    "Evaluator",
    "FIDMetric",
    "LPIPSMetric",
    "MetricResult",
    "PerImageMean",
    "Sample",
    "build_metrics",
    "get_protocol",
    "markdown_table",
    "read_sample",
    "scan_folder",
    "write_reports",
]
