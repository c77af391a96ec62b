"""Fleet image distribution: choosing each fetching node's sources (see assign.py)."""
