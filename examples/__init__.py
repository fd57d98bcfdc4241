"""Runnable examples for jaxbn (not part of the installed package)."""
