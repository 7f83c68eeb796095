"""Training: the LightningModule, the learning-rate schedule, callbacks and the run assembly."""
