"""natvision pipelines: thin wiring from command-line flags to Beam graphs."""
