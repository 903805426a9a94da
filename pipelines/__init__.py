"""TermiDator pipelines."""
