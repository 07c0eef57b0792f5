"""hf_crosscoder: train crosscoders on any Hugging Face transformers model."""

from .activations import ActivationsStore
from .cache import CacheActivationsRunner, CacheActivationsRunnerConfig
from .config import CrosscoderArgs, CrosscoderConfig, LanguageModelCrosscoderRunnerConfig
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


def __getattr__(name: str):
    # imported on first use, not here: `python -m hf_crosscoder.llm_crosscoder_training_runner` runs that
    # module as __main__, and a copy already imported by the package makes runpy warn on every launch
    if name == "LanguageModelCrosscoderTrainingRunner":
        from .llm_crosscoder_training_runner import LanguageModelCrosscoderTrainingRunner

        return LanguageModelCrosscoderTrainingRunner
    raise AttributeError(f"module 'hf_crosscoder' has no attribute {name!r}")
