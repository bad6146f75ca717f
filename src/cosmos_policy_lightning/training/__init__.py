"""LightningCLI entry points and training callbacks."""
