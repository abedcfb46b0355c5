"""sweeps: the window search and Pareto sweeps over local-global attention models."""
