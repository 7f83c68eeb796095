"""Training: the LightningModule, callbacks and throughput accounting."""
