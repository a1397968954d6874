"""The Llama-family MiniLLM on jaxpaged: config, model, weights, tokenizer, generation, training, CLI."""

from jaxpaged.models.config import PRESET_NAMES, ModelConfig, preset
from jaxpaged.models.llama import MiniLLM

__all__ = ["MiniLLM", "ModelConfig", "PRESET_NAMES", "preset"]
