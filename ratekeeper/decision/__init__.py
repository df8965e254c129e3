"""The decision: plans, the checker, its outcomes, the local cache, refunds, denial counts."""
