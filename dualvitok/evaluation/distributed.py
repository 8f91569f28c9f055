"""torch.distributed helpers for evaluation: the package's one implementation, :mod:`dualvitok._utils.distributed`."""

from .._utils.distributed import (  # noqa: F401
    DistInfo,
    all_gather_json,
    all_reduce_sum,
    barrier,
    init_distributed,
    reduce_device,
    shutdown_distributed,
)
