"""The thin command-line interface."""
