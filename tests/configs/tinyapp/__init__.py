"""A host project's tiny app: one model, its own tests, task functions for the probe."""
