"""Downstream sync: the change stream delivered to webhooks (SPEC §5)."""
