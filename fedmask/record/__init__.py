"""What a run writes down: the bytes ledger, failures, round lines and summary, mask
diagnostics, checkpoints and experiment trackers."""
