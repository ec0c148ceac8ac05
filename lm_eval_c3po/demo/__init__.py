"""Offline demo material: the planted-pathway benchmark (a tiny OLMoE with a known routing fault)."""

from lm_eval_c3po.demo.planted import PlantedConfig, PlantedPaths, build_planted, load_split

__all__ = ["PlantedConfig", "PlantedPaths", "build_planted", "load_split"]
