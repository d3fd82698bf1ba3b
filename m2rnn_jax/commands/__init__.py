"""Subcommands of the ``m2rnn-jax`` CLI; each module has ``add_parser`` and a ``run`` set via defaults."""
