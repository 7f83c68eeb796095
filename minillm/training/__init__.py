"""Training: the LightningModule, the learning-rate schedule, callbacks, throughput accounting and
the run assembly."""

from minillm.training.module import LanguageModel
from minillm.training.run import train

__all__ = ["LanguageModel", "train"]
