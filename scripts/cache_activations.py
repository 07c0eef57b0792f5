"""Harvest activations once into a cache that training runs read with --cached_activations_path.

    python scripts/cache_activations.py --model_name EleutherAI/pythia-70m --d_model 512 \\
        --hook_names_in blocks.0.hook_resid_post blocks.1.hook_resid_post \\
        --hook_names_out blocks.3.hook_resid_post blocks.4.hook_resid_post \\
        --training_tokens 10000000 --new_cached_activations_path ./pythia70m_cache
    python scripts/cache_activations.py --config cache.yaml [--flag value ...]   # flags override the file
    accelerate launch scripts/cache_activations.py ...   # one dataset shard per process
"""

from __future__ import annotations

from hf_crosscoder.cache import CacheActivationsRunner, CacheActivationsRunnerConfig
from hf_crosscoder.cli import parse_dataclass, run_cli


def parse_config(argv: list[str] | None = None) -> CacheActivationsRunnerConfig:
    """Flags, or `--config file.yaml|json` whose values the other flags override."""
    return parse_dataclass(CacheActivationsRunnerConfig, argv)


def main(argv: list[str] | None = None) -> None:
    """User errors print one line `error: ...` and exit 2 (`--debug`: the traceback)."""
    def write(cfg: CacheActivationsRunnerConfig) -> None:
        print(f"activation cache written to {CacheActivationsRunner(cfg).run()}")

    run_cli(CacheActivationsRunnerConfig, write, argv)


if __name__ == "__main__":
    main()
