"""Downstream sync: the change stream delivered to webhooks (docs/guarantees.md §6.8)."""
