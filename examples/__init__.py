"""Runnable examples: the quickstart, a sync app and the framework integrations."""
