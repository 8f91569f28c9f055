"""Subcommands of the ``dualvitok`` command line (one module each)."""
