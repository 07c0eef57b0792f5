"""Harvest activations once into a cache that training runs read with --cached_activations_path.

    python scripts/cache_activations.py --model_name EleutherAI/pythia-70m --d_model 512 \\
        --hook_names_in blocks.0.hook_resid_post blocks.1.hook_resid_post \\
        --hook_names_out blocks.3.hook_resid_post blocks.4.hook_resid_post \\
        --training_tokens 10000000 --new_cached_activations_path ./pythia70m_cache
    python scripts/cache_activations.py --config cache.yaml [--flag value ...]   # flags override the file
    accelerate launch scripts/cache_activations.py ...   # one dataset shard per process
"""

from __future__ import annotations

import sys

import yaml
from transformers import HfArgumentParser

from hf_crosscoder.cache import CacheActivationsRunner, CacheActivationsRunnerConfig


def parse_config(argv: list[str]) -> CacheActivationsRunnerConfig:
    """Flags, or `--config file.yaml` whose values become the defaults of the other flags."""
    parser = HfArgumentParser(CacheActivationsRunnerConfig)
    parser.add_argument("--config", default=None, help="YAML file of CacheActivationsRunnerConfig fields.")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        with open(known.config) as f:
            values = yaml.safe_load(f) or {}
        unknown = sorted(set(values) - {a.dest for a in parser._actions})
        if unknown:
            raise ValueError(f"{known.config}: unknown fields {unknown}; see --help for the valid ones.")
        parser.set_defaults(**values)
    cfg, _ = parser.parse_args_into_dataclasses(args=argv)  # the Namespace beside it holds --config
    return cfg


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    path = CacheActivationsRunner(cfg).run()
    print(f"activation cache written to {path}")


if __name__ == "__main__":
    main()
