"""Test-time adaptation and weight averaging demo on scikit-learn digits (see README.md)."""
