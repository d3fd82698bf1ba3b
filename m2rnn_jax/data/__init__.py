"""Everything that turns files into batches: token files, state-tracking tasks, batch sources."""
