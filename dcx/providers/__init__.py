"""Provider plugins: each turns node requests into reachable machines. See base.py."""
