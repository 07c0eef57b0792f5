"""Hub integration, offline: loading from a Hub cache, pushing to a local FakeHub, the model card."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants, hf_hub_download, metadata_load
from safetensors.torch import load_file
from transformers import AutoModel, GPTNeoXConfig

from hf_crosscoder import Crosscoder, CrosscoderConfig
from hf_crosscoder.hub import (
    INDEX_MARKER,
    build_model_card,
    push_crosscoder_to_hub,
    push_folder_to_hub,
    save_for_hub,
)

try:  # tests/ as a package or as rootdir-inserted modules (pytest's default import mode)
    from .hub_server import FakeHub, point_clients_at, validate_card_metadata
except ImportError:
    from hub_server import FakeHub, point_clients_at, validate_card_metadata

FIXTURES = Path(__file__).parent / "fixtures"
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def tiny(seed: int = 0, **kwargs) -> Crosscoder:
    torch.manual_seed(seed)
    kwargs = {"d_model": 8, "d_sae": 16, "hook_names_in": HOOKS, "hook_names_out": HOOKS,
              "model_name": "EleutherAI/pythia-70m", "dataset_path": "roneneldan/TinyStories",
              "training_tokens": 2_000_000, **kwargs}
    return Crosscoder(CrosscoderConfig(**kwargs))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: patch the constant too


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    hub = FakeHub()
    point_clients_at(monkeypatch, hub.start(), tmp_path / "hf_cache")
    yield hub
    hub.stop()


# ------------------------------------------------------------------------------ (1) Hub cache, offline
def put_in_cache(cache: Path, repo_id: str, commit: str, files: dict[str, Path], refs: tuple[str, ...] = ()):
    """Lay files out as huggingface_hub's cache does: models--org--name/snapshots/<commit>/, refs/<ref>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for path_in_repo, src in files.items():
        dest = repo / "snapshots" / commit / path_in_repo
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def saved(crosscoder: Crosscoder, folder: Path, prefix: str = "") -> dict[str, Path]:
    crosscoder.save_pretrained(folder)
    return {prefix + name: folder / name for name in ("config.json", "model.safetensors")}


def test_loads_from_hub_cache_offline_with_subfolder_and_revision(tmp_path, offline):
    main, sub, old = tiny(0), tiny(1, architecture="topk_crosscoder", k=4), tiny(2)
    cache, c_main, c_old = tmp_path / "cache", "a" * 40, "b" * 40
    put_in_cache(cache, "org/name", c_main, {**saved(main, tmp_path / "m"), **saved(sub, tmp_path / "s", "sub/")},
                 refs=("main",))
    put_in_cache(cache, "org/name", c_old, saved(old, tmp_path / "o"), refs=("v1",))

    assert same_weights(Crosscoder.from_pretrained("org/name", cache_dir=cache), main)
    loaded_sub = Crosscoder.from_pretrained("org/name", subfolder="sub", cache_dir=cache)
    assert loaded_sub.config.architecture == "topk_crosscoder" and same_weights(loaded_sub, sub)
    assert same_weights(Crosscoder.from_pretrained("org/name", revision="v1", cache_dir=cache), old)
    assert same_weights(Crosscoder.from_pretrained("org/name", revision=c_old, cache_dir=cache), old)
    assert same_weights(AutoModel.from_pretrained("org/name", cache_dir=cache, token=False), main)


def test_loads_from_default_hub_cache(tmp_path, offline, monkeypatch):
    cc = tiny(3)
    put_in_cache(tmp_path, "org/default", "c" * 40, saved(cc, tmp_path / "m"), refs=("main",))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # what HF_HUB_CACHE sets at import
    assert same_weights(Crosscoder.from_pretrained("org/default"), cc)


def test_frozen_config_v1_loads_with_same_outputs():
    folder = FIXTURES / "config_v1"
    cc = Crosscoder.from_pretrained(folder)
    assert cc.config.config_version == 1 and cc.config.activation_norm_folded
    assert cc.config.hook_names_in == HOOKS and cc.config.d_sae == 8
    expected = load_file(folder / "expected.safetensors")
    out = cc(expected["acts_in"])
    torch.testing.assert_close(out.feature_acts, expected["feature_acts"])
    torch.testing.assert_close(out.reconstruction, expected["reconstruction"])


# ------------------------------------------------------------------------------ (2) upload: FakeHub
def test_push_to_hub_round_trip(fake_hub, tmp_path):
    cc = tiny(4)
    cc.push_to_hub("org/name")  # PreTrainedModel's own
    assert {"config.json", "model.safetensors", "README.md"} <= set(fake_hub.files("org/name"))
    loaded = Crosscoder.from_pretrained("org/name", cache_dir=tmp_path / "c1")
    assert same_weights(loaded, cc)
    x = torch.randn(3, 2, 8)
    torch.testing.assert_close(loaded(x).reconstruction, cc(x).reconstruction, rtol=0, atol=0)
    # transformers' push_to_hub writes its generic card; push_crosscoder_to_hub writes ours
    assert ModelCard(fake_hub.files("org/name")["README.md"].decode()).data.library_name == "transformers"
    push_crosscoder_to_hub(cc, "org/name", metrics={"l0": 4.0})
    card = ModelCard.load("org/name")
    assert card.data.library_name == "hf_crosscoder" and "| L0 (active latents per token) | 4 |" in card.text
    assert same_weights(Crosscoder.from_pretrained("org/name", cache_dir=tmp_path / "c2"), cc)
    assert not fake_hub.unhandled


def test_push_to_branch_then_load_revision(fake_hub, tmp_path):
    first, second = tiny(5), tiny(6)
    first.push_to_hub("org/branchy")
    second.push_to_hub("org/branchy", revision="v2")
    assert same_weights(Crosscoder.from_pretrained("org/branchy", cache_dir=tmp_path), first)
    assert same_weights(Crosscoder.from_pretrained("org/branchy", revision="v2", cache_dir=tmp_path), second)


def test_push_folder_with_card_and_subfolders(fake_hub, tmp_path):
    a, b = tiny(7), tiny(8, architecture="jumprelu_crosscoder")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "fvu.png").write_bytes(b"\x89PNG fake")
    (tmp_path / "a" / "checkpoints").mkdir()  # run state that must stay local
    (tmp_path / "a" / "checkpoints" / "state.json").write_text("{}")
    save_for_hub(a, tmp_path / "a", metrics={"l0": 12.5}, repo_id="org/multi", subfolder="layers01")
    save_for_hub(b, tmp_path / "b", repo_id="org/multi", subfolder="jumprelu")
    push_folder_to_hub(tmp_path / "a", "org/multi", subfolder="layers01")
    push_folder_to_hub(tmp_path / "b", "org/multi", subfolder="jumprelu")

    files = set(fake_hub.files("org/multi"))
    assert {"layers01/config.json", "layers01/model.safetensors", "layers01/README.md", "layers01/fvu.png",
            "jumprelu/config.json", "README.md"} <= files
    assert not any("checkpoints" in f for f in files)
    cache = tmp_path / "cache"
    assert same_weights(Crosscoder.from_pretrained("org/multi", subfolder="layers01", cache_dir=cache), a)
    assert same_weights(Crosscoder.from_pretrained("org/multi", subfolder="jumprelu", cache_dir=cache), b)

    card = metadata_load(hf_hub_download("org/multi", "layers01/README.md", cache_dir=cache))
    assert card["library_name"] == "hf_crosscoder" and card["base_model"] == "EleutherAI/pythia-70m"
    root = fake_hub.files("org/multi")["README.md"].decode()
    assert INDEX_MARKER in root and 'subfolder="layers01"' in root and 'subfolder="jumprelu"' in root
    assert ModelCard(root).data.library_name == "hf_crosscoder"
    assert fake_hub.validated_cards and not fake_hub.unhandled


def test_push_folder_keeps_a_hand_written_root_card(fake_hub, tmp_path):
    save_for_hub(tiny(9), tmp_path / "a")
    push_folder_to_hub(tmp_path / "a", "org/mine")  # root README = this crosscoder's own card
    push_folder_to_hub(tmp_path / "a", "org/mine", subfolder="copy")
    assert INDEX_MARKER not in fake_hub.files("org/mine")["README.md"].decode()


def test_downloaded_repo_loads_offline_afterwards(fake_hub, tmp_path, monkeypatch):
    cc = tiny(10)
    save_for_hub(cc, tmp_path / "out")
    push_folder_to_hub(tmp_path / "out", "org/cached")
    cache = tmp_path / "cache"
    Crosscoder.from_pretrained("org/cached", cache_dir=cache)  # fills the real cache layout
    fake_hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert same_weights(Crosscoder.from_pretrained("org/cached", cache_dir=cache), cc)


# ------------------------------------------------------------------------------ (3) the model card
METRICS = {
    "explained_variance/blocks.0.hook_resid_post": 0.9187655, "explained_variance/blocks.1.hook_resid_post": 0.875,
    "mse/blocks.0.hook_resid_post": 0.65, "cossim/blocks.0.hook_resid_post": 0.95,
    "explained_variance": 0.9, "l0": 31.7, "frac_alive": 0.9875, "freq_over_10_percent": 0.0,
    "ce_loss_without_sae": 3.25, "ce_loss_with_sae/blocks.0.hook_resid_post": 3.5,
    "ce_loss_score/blocks.0.hook_resid_post": 0.875, "ce_loss_score/blocks.1.hook_resid_post": None,
    "kl_div_with_ablation/blocks.0.hook_resid_post": None, "kl_div_score/blocks.0.hook_resid_post": None,
}


def test_model_card_renders_metadata_tables_and_metrics(tmp_path):
    cc = tiny(11)
    run_config = {"lr": 3e-4, "hook_names_in": HOOKS, "seed": 42, "device": None}
    card = build_model_card(cc, METRICS, run_config, plots=["fvu.png"], repo_id="org/name")
    data = ModelCard(str(card)).data.to_dict()  # metadata parses back
    assert data["library_name"] == "hf_crosscoder" and data["license"] == "apache-2.0"
    assert data["base_model"] == "EleutherAI/pythia-70m" and data["datasets"] == ["roneneldan/TinyStories"]
    assert {"crosscoder", "sparse-autoencoder", "interpretability"} <= set(data["tags"])
    assert validate_card_metadata(str(card)) == []
    text = card.text
    for hook in HOOKS:
        assert f"| `{hook}` | {hook[7]} | input and output | yes | yes |" in text
    # columns without a value in any row (L2 ratio, bias, CE zero-ablated, KL) are dropped
    assert ("| output hook | explained variance | MSE (raw scale) | cossim | CE loss with crosscoder | "
            "CE loss score |") in text
    assert "| `blocks.0.hook_resid_post` | 0.9188 | 0.65 | 0.95 | 3.5 | 0.875 |" in text
    assert "| `blocks.1.hook_resid_post` | 0.875 | n/a | n/a | n/a | n/a |" in text
    assert "| L2 ratio |" not in text and "KL div with" not in text
    assert "| L0 (active latents per token) | 31.7 |" in text and "| CE loss without crosscoder (clean) | 3.25 |" in text
    assert "| tokens trained | 2,000,000 |" in text and "| d_sae (latents) | 16 |" in text
    assert "--hook_names_in blocks.0.hook_resid_post blocks.1.hook_resid_post" in text
    assert 'Crosscoder.from_pretrained("org/name")' in text and "![fvu.png](fvu.png)" in text


def test_card_model_index_holds_the_held_out_metrics(tmp_path):
    """model-index (eval_results) parses back through huggingface_hub, with one result per finite metric
    (overall and per hook), on the training dataset's held-out split; no absolute path anywhere."""
    cc = tiny(14, model_name=str(tmp_path / "models" / "pythia"), dataset_path=str(tmp_path / "data.jsonl"))
    card = build_model_card(cc, METRICS, {"output_path": "out"})
    assert str(tmp_path) not in str(card)
    parsed = ModelCard(str(card))
    results = parsed.data.eval_results
    got = {(r.metric_type, r.metric_config): r.metric_value for r in results}
    assert got == {("explained_variance", None): 0.9, ("explained_variance", HOOKS[0]): 0.9187655,
                   ("explained_variance", HOOKS[1]): 0.875, ("ce_loss_score", HOOKS[0]): 0.875, ("l0", None): 31.7}
    assert all(r.dataset_split == "held-out" and r.dataset_type == "local" for r in results)
    index = parsed.data.to_dict()["model-index"]
    assert index[0]["name"] and index[0]["results"][0]["task"]["type"] == "feature-extraction"
    assert validate_card_metadata(str(card)) == []
    assert "model-index" not in build_model_card(cc).data.to_dict()  # no metrics: no model-index


def test_card_without_metrics_and_local_model(tmp_path):
    cc = tiny(12, model_name=str(tmp_path), dataset_path="data.txt", architecture="batchtopk_crosscoder", k=4)
    card = build_model_card(cc, command="accelerate launch scripts/train.py --config run.yaml")
    # a local model folder without a known Hub id is named by its folder name, never its path; a local data
    # file is no Hub dataset
    assert card.data.to_dict()["base_model"] == tmp_path.name and "datasets" not in card.data.to_dict()
    assert str(tmp_path) not in str(card) and f"{tmp_path.name} (from a local folder)" in card.text
    assert "No evaluation metrics were recorded" in card.text and "| output hook |" not in card.text
    assert "accelerate launch scripts/train.py --config run.yaml" in card.text
    assert "| k | 4 |" in card.text and "inference threshold" in card.text


def test_card_of_a_clt_says_what_each_group_reads_and_writes():
    hooks_in = [f"blocks.{i}.ln2.hook_normalized" for i in range(3)]
    hooks_out = [f"blocks.{i}.hook_mlp_out" for i in range(3)]
    cc = tiny(14, hook_names_in=hooks_in, hook_names_out=hooks_out, d_sae=12, layer_structure="cross_layer")
    text = build_model_card(cc).text
    assert "| group | latents | reads | writes |" in text
    assert "| 0 | 0-3 | `blocks.0.ln2.hook_normalized` | `blocks.0.hook_mlp_out`, `blocks.1.hook_mlp_out`, " \
           "`blocks.2.hook_mlp_out` |" in text
    assert "| 2 | 8-11 | `blocks.2.ln2.hook_normalized` | `blocks.2.hook_mlp_out` |" in text
    assert "| group |" not in build_model_card(tiny(15)).text  # dense: one group, no table


def test_save_for_hub_writes_folder_and_refuses_unfolded(tmp_path):
    cc = tiny(13)
    (tmp_path / "plot_a.png").write_bytes(b"png")
    save_for_hub(cc, tmp_path, metrics=METRICS)
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in tmp_path.iterdir()}
    meta = metadata_load(tmp_path / "README.md")
    assert meta["library_name"] == "hf_crosscoder" and "![plot_a.png](plot_a.png)" in (tmp_path / "README.md").read_text()
    cc.config.activation_scale_in, cc.config.activation_scale_out = [1.0, 2.0], [1.0, 2.0]
    with pytest.raises(ValueError, match="fold_activation_norm_scaling"):
        save_for_hub(cc, tmp_path / "unfolded")


# ------------------------------------------------------------------------------ (4) bad input
def test_missing_repo_offline_is_oserror(tmp_path, offline):
    with pytest.raises(OSError):
        Crosscoder.from_pretrained("org/does-not-exist", cache_dir=tmp_path)


def test_missing_repo_on_hub_is_oserror(fake_hub, tmp_path):
    with pytest.raises(OSError, match="org/nope"):
        Crosscoder.from_pretrained("org/nope", cache_dir=tmp_path)


def test_missing_weights_file_is_clear(tmp_path):
    tiny(14).config.save_pretrained(tmp_path)
    with pytest.raises(OSError, match="model.safetensors"):
        Crosscoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="save_for_hub"):
        push_folder_to_hub(tmp_path, "org/x")


def test_other_model_type_is_refused(tmp_path):
    GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                  vocab_size=100).save_pretrained(tmp_path)
    with pytest.raises(ValueError):
        Crosscoder.from_pretrained(tmp_path)


def test_other_model_type_error_names_model_type(tmp_path):
    GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                  vocab_size=100).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="gpt_neox"):
        Crosscoder.from_pretrained(tmp_path)
