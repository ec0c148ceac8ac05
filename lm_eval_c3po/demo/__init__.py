"""Offline demo material: the planted-pathway benchmark (a tiny OLMoE with a known routing fault)."""

from lm_eval_c3po.demo.planted import PlantedPaths, build_planted, load_split
from lm_eval_c3po.demo.planted_train import PlantedConfig

__all__ = ["PlantedConfig", "PlantedPaths", "build_planted", "load_split"]
