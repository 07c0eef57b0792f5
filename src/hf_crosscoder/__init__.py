"""hf_crosscoder: train crosscoders on any Hugging Face transformers model."""

from .activations import ActivationsStore
from .cache import CacheActivationsRunner, CacheActivationsRunnerConfig
from .config import CrosscoderArgs, CrosscoderConfig, LanguageModelCrosscoderRunnerConfig
from .llm_crosscoder_training_runner import LanguageModelCrosscoderTrainingRunner
from .modeling import ARCHITECTURES, Crosscoder, CrosscoderOutput

__all__ = [
    "ARCHITECTURES",
    "ActivationsStore",
    "CacheActivationsRunner",
    "CacheActivationsRunnerConfig",
    "Crosscoder",
    "CrosscoderArgs",
    "CrosscoderConfig",
    "CrosscoderOutput",
    "LanguageModelCrosscoderRunnerConfig",
    "LanguageModelCrosscoderTrainingRunner",
]
