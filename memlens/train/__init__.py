"""Training: objectives, the loop, run directories and the linear probe."""

from memlens.train.loop import TrainResult, train_loop
from memlens.train.run import load_encoder, read_run

__all__ = ["TrainResult", "load_encoder", "read_run", "train_loop"]
