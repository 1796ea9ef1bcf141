"""The subcommands of ``python -m seqpar``, one module each (see :mod:`seqpar.cli`)."""
