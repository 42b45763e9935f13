"""Training: models, losses, configuration and the MixNN trainer."""
