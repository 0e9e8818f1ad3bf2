"""Cluster lifecycle operations, one module each: session (a command's hold on a cluster), apply
(create), preview (plan), scale_down, destroy, health, status, run."""
