"""provision_project: one module per step and the workflow that chains them."""
