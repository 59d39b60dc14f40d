"""Fine-tuning: recipes, the trained network, losses/miners/samplers, optimiser and schedule, the training loop.

``train(make_config("circle", data="data", model="efficientnet-lite0", trainable="head"))`` writes a run folder;
``load_checkpoint_model("RUN_DIR/best.pt")`` gives back an EmbeddingModel for retrieval.
"""

from .loop import TrainResult, train
from .model import load_checkpoint_model
from .recipes import RECIPES, TrainConfig, default_recipe, make_config

__all__ = ["RECIPES", "TrainConfig", "TrainResult", "default_recipe", "load_checkpoint_model", "make_config", "train"]
