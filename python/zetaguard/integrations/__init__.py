"""Framework integrations. Each module imports its framework itself, on first use."""
