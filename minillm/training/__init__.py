"""Training: the run's assembly and checks, the LightningModule, the learning-rate schedule,
callbacks, loggers and throughput accounting."""

from minillm.training.assembly import Run, assemble
from minillm.training.module import LanguageModel
from minillm.training.run import train

__all__ = ["LanguageModel", "Run", "assemble", "train"]
