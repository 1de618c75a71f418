"""The audit: a resumable grid of settings x client batches, its report, and utility training."""
