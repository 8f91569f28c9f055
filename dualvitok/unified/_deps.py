"""Imported first by :mod:`dualvitok.unified`: fails with the extra to install when transformers is missing."""

from .._utils.deps import require

transformers = require("transformers", "unified", "dualvitok.unified")
