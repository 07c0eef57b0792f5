import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import D_MODEL, make_runner_config
from safetensors.torch import load_file

import hf_crosscoder.cache as cache_module
from hf_crosscoder.activations import ActivationsStore
from hf_crosscoder.cache import CacheActivationsRunner, CacheActivationsRunnerConfig

HOOKS_IN = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
HOOKS_OUT = ["blocks.2.hook_resid_post", "blocks.3.hook_resid_post"]


def _cache_config(tiny_model_dir, text_dataset_path, path, **overrides):
    kwargs = dict(new_cached_activations_path=str(path), model_name=tiny_model_dir, d_model=D_MODEL,
                  hook_names_in=HOOKS_IN, hook_names_out=["blocks.3.hook_resid_post", *HOOKS_OUT],
                  dataset_path=text_dataset_path, context_size=32, store_batch_size_prompts=4,
                  training_tokens=800, shard_size_tokens=200, device="cpu")
    return CacheActivationsRunnerConfig(**{**kwargs, **overrides})


def _load_script():
    path = Path(__file__).parents[1] / "scripts" / "cache_activations.py"
    spec = importlib.util.spec_from_file_location("cache_activations_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("cache_special", [False, True])
def test_round_trip_equals_live_batches_and_resumes(tiny_model_dir, text_dataset_path, tmp_path, cache_special):
    path = CacheActivationsRunner(_cache_config(tiny_model_dir, text_dataset_path, tmp_path / "cache",
                                                exclude_special_tokens=not cache_special)).run()
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["n_tokens"] == 800 and meta["d_model"] == D_MODEL and len(meta["shards"]) == 4
    assert meta["hook_names"] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
                                  "blocks.3.hook_resid_post", "blocks.2.hook_resid_post"]
    shard = load_file(str(path / meta["shards"][0]["file"]))
    assert shard["blocks.3.hook_resid_post"].shape == (200, D_MODEL) and bool(shard["is_special"].any()) == cache_special

    # a cache holds the dataset from its start: the live stream without a held-out slice is the same
    live_cfg = make_runner_config(tiny_model_dir, text_dataset_path, normalize_activations="none",
                                  eval_holdout_sequences=0)
    cached_cfg = make_runner_config(tiny_model_dir, text_dataset_path, normalize_activations="none",
                                    cached_activations_path=str(path))
    live, cached = ActivationsStore(live_cfg), ActivationsStore(cached_cfg)
    assert cached.model is None and cached.tokenizer is None
    expected = [live.next_batch() for _ in range(6)]  # 640 rows harvested: within the 800 cached
    for i in range(3):
        assert all(torch.equal(a, b) for a, b in zip(cached.next_batch(), expected[i]))
    cached.save(tmp_path / "state")
    resumed = ActivationsStore(cached_cfg)
    resumed.load(tmp_path / "state")
    for want in expected[3:]:
        assert all(torch.equal(a, b) for a, b in zip(resumed.next_batch(), want))
    with pytest.raises(ValueError, match="needs the language model"):
        cached.next_tokens()


def test_normalization_from_cache_metadata(tiny_model_dir, text_dataset_path, tmp_path):
    path = CacheActivationsRunner(_cache_config(tiny_model_dir, text_dataset_path, tmp_path / "c",
                                                training_tokens=400)).run()
    means = json.loads((path / "metadata.json").read_text())["mean_norms"]
    store = ActivationsStore(make_runner_config(tiny_model_dir, text_dataset_path, cached_activations_path=str(path)))
    expected = torch.tensor([math.sqrt(D_MODEL) / means[h] for h in HOOKS_IN])
    torch.testing.assert_close(store.scale_in, expected)
    # b_dec's data init reads the buffer although the scales needed none of it (the metadata had them)
    mean = store.mean_out()
    acts_in, acts_out = store.next_batch()
    assert abs(acts_out.norm(dim=-1).mean().item() - math.sqrt(D_MODEL)) < 0.1 * math.sqrt(D_MODEL)
    assert mean.shape == (2, D_MODEL) and mean.norm(dim=-1).min() > 0


def test_mismatched_metadata_is_refused(tiny_model_dir, text_dataset_path, tmp_path):
    path = CacheActivationsRunner(_cache_config(tiny_model_dir, text_dataset_path, tmp_path / "c",
                                                training_tokens=100)).run()
    for overrides in ({"hook_names_out": ["blocks.2.hook_mlp_out"]}, {"d_model": 32}):
        cfg = make_runner_config(tiny_model_dir, text_dataset_path, cached_activations_path=str(path), **overrides)
        with pytest.raises(ValueError, match="this run needs .* write a cache with these hooks"):
            ActivationsStore(cfg)


def test_interrupted_write_leaves_no_complete_looking_shard(tiny_model_dir, text_dataset_path, tmp_path,
                                                           monkeypatch):
    real_save, calls = cache_module.save_file, []

    def crash_on_second_shard(tensors, filename):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"half a shard")  # the process dies mid-write
            raise KeyboardInterrupt
        real_save(tensors, filename)

    monkeypatch.setattr(cache_module, "save_file", crash_on_second_shard)
    cfg = _cache_config(tiny_model_dir, text_dataset_path, tmp_path / "c", shard_size_tokens=100)
    with pytest.raises(KeyboardInterrupt):
        CacheActivationsRunner(cfg).run()
    shards = sorted((tmp_path / "c").glob("shard_*.safetensors"))
    assert [p.name for p in shards] == ["shard_00000_00000.safetensors"]
    assert load_file(str(shards[0]))["blocks.0.hook_resid_post"].shape == (100, D_MODEL)
    assert not (tmp_path / "c" / "metadata.json").exists()
    with pytest.raises(ValueError, match="not a complete activation cache .no metadata.json"):
        ActivationsStore(make_runner_config(tiny_model_dir, text_dataset_path,
                                            cached_activations_path=str(tmp_path / "c")))
    with pytest.raises(ValueError, match="already exists and is not an empty directory"):
        CacheActivationsRunner(cfg).run()


def test_cli_with_yaml_config_and_overrides(tiny_model_dir, text_dataset_path, tmp_path):
    script = _load_script()
    (tmp_path / "cache.yaml").write_text(
        f"model_name: {tiny_model_dir}\nd_model: {D_MODEL}\ndataset_path: {text_dataset_path}\n"
        f"hook_names_in: [blocks.0.hook_resid_post]\nhook_names_out: [blocks.1.hook_mlp_out]\n"
        f"context_size: 16\ntraining_tokens: 1000\nstreaming: false\ndevice: cpu\n"
        f"new_cached_activations_path: {tmp_path / 'from_yaml'}\n")
    argv = ["--config", str(tmp_path / "cache.yaml"), "--training_tokens", "100",
            "--new_cached_activations_path", str(tmp_path / "cli")]
    cfg = script.parse_config(argv)
    assert cfg.training_tokens == 100 and cfg.context_size == 16 and cfg.streaming is False
    assert cfg.hook_names == ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    script.main(argv)
    assert json.loads((tmp_path / "cli" / "metadata.json").read_text())["n_tokens"] == 100
    (tmp_path / "bad.yaml").write_text("modle_name: x\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) modle_name"):
        script.parse_config(["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(ValueError, match="new_cached_activations_path is required"):
        CacheActivationsRunnerConfig(hook_names_in=["a"], hook_names_out=["b"])


def test_cache_and_runner_share_the_harvest_fields():
    from hf_crosscoder.config import HarvestArgs, LanguageModelCrosscoderRunnerConfig

    shared = {f.name: f for f in dataclasses.fields(HarvestArgs)}
    for cls in (CacheActivationsRunnerConfig, LanguageModelCrosscoderRunnerConfig):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, f in shared.items():  # declared once: same default and help in both CLIs
            assert fields[name].default == f.default and fields[name].metadata == f.metadata, (cls, name)
    own = [f.name for f in dataclasses.fields(CacheActivationsRunnerConfig) if f.name not in shared]
    assert own == ["new_cached_activations_path", "shard_size_tokens"]


@pytest.mark.parametrize("kw,match", [
    ({"hook_names_out": []}, "hook_names_out must be a non-empty list"),
    ({"d_model": 0}, "d_model must be a positive"),
    ({"context_size": 0}, "context_size must be positive"),
    ({"store_batch_size_prompts": 0}, "store_batch_size_prompts must be positive"),
    ({"training_tokens": 0}, "training_tokens must be positive"),
    ({"shard_size_tokens": 0}, "shard_size_tokens must be positive"),
    ({"dtype": "float33"}, "dtype='float33' is not a torch dtype"),
])
def test_bad_cache_config_raises_naming_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        CacheActivationsRunnerConfig(**{"new_cached_activations_path": "c", "hook_names_in": ["a"],
                                        "hook_names_out": ["b"], **kw})


def test_crosscoder_trained_from_a_cache_records_where_the_rows_came_from(tiny_model_dir, text_dataset_path,
                                                                         tmp_path):
    # no model_name given (the field's default is another model): config.json and the model card must name
    # the model, data and context the cache was harvested with
    from hf_crosscoder import LanguageModelCrosscoderTrainingRunner

    path = CacheActivationsRunner(_cache_config(tiny_model_dir, text_dataset_path, tmp_path / "c",
                                                training_tokens=400)).run()
    cfg = make_runner_config(tiny_model_dir, text_dataset_path, cached_activations_path=str(path),
                             model_name="EleutherAI/pythia-70m", dataset_path="roneneldan/TinyStories",
                             context_size=128, training_tokens=128, output_path=str(tmp_path / "out"))
    config = LanguageModelCrosscoderTrainingRunner(cfg).run().config
    # named publicly (naming.py): the local model folder by its name, the corpus file by its file name
    model_folder = tiny_model_dir.rstrip("/").rsplit("/", 1)[-1]
    assert (config.model_name, config.dataset_path, config.context_size) == (model_folder, "corpus.jsonl", 32)
    assert config.model_is_local and config.dataset_is_local
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"{model_folder} (from a local folder)" in card and str(tiny_model_dir) not in card


def test_a_cache_is_not_created_when_the_model_does_not_match(tiny_model_dir, text_dataset_path, tmp_path):
    for overrides, match in (({"d_model": 32}, "d_model=32 does not match"),
                             ({"hook_names_in": ["blocks.0.hook_bogus"]}, "Unknown hook name")):
        with pytest.raises(ValueError, match=match):
            CacheActivationsRunner(_cache_config(tiny_model_dir, text_dataset_path, tmp_path / "c", **overrides)).run()
        assert not (tmp_path / "c").exists()
