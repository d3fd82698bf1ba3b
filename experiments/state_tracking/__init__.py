"""State-tracking experiments: several groups and seeds of the ``state-tracking-*`` presets, one summary."""
