"""plots.py: the signature computation, and drawing from whatever files a run folder holds."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from hf_crosscoder import Crosscoder, CrosscoderConfig
from hf_crosscoder.metrics import FEATURE_STATS_FILE
from hf_crosscoder.plots import (
    CURVES_FILE,
    DENSITY_FILE,
    SIGNATURE_FILE,
    SPAN_FILE,
    TARGET_SHARE_FILE,
    decoder_norm_shares,
    draw_all,
    layer_span,
    main,
    read_training_log,
    signature_order,
    target_shares_by_group,
)

pytest.importorskip("matplotlib")
HOOKS = [f"blocks.{i}.hook_resid_post" for i in range(3)]


def small_crosscoder(d_sae: int = 6) -> Crosscoder:
    torch.manual_seed(0)
    return Crosscoder(CrosscoderConfig(d_model=4, hook_names_in=HOOKS, hook_names_out=HOOKS, d_sae=d_sae))


def test_shares_are_taken_in_normalized_space():
    cc = small_crosscoder()
    before = decoder_norm_shares(cc)
    cc.fold_activation_norm_scaling([1.0, 10.0, 100.0], [1.0, 10.0, 100.0])
    # folding divides W_dec's blocks by the scales; the shares must not see it
    torch.testing.assert_close(decoder_norm_shares(cc), before)
    torch.testing.assert_close(before.sum(1), torch.ones(6))


def test_order_and_span():
    shares = torch.tensor([[0.1, 0.9, 0.0], [0.98, 0.01, 0.01], [0.4, 0.3, 0.3], [0.0, 0.2, 0.8]])
    assert signature_order(shares).tolist() == [1, 2, 0, 3]  # by main layer, most concentrated first
    assert layer_span(shares).tolist() == [1, 1, 3, 2]


def test_draw_all_from_a_run_folder(tmp_path):
    cc = small_crosscoder()
    density = torch.tensor([0.0, 1e-2, 10**-1.5, 1e-3, 10**-0.5, 1e-1])  # as the final eval writes it
    save_file({"feature_density": density}, str(tmp_path / FEATURE_STATS_FILE))
    rows = [{"step": s, "loss": 10 / s, "l0": 3.0, **{f"fvu/{h}": 0.5 for h in HOOKS}} for s in (1, 2, 3)]
    (tmp_path / "training_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4')
    with open(tmp_path / "training_log.jsonl", "a") as f:  # a resumed run logs step 3 again
        f.write("\n" + json.dumps({**rows[-1], "loss": 1.0}) + "\n")
    assert [r["step"] for r in read_training_log(tmp_path / "training_log.jsonl")] == [1, 2, 3]
    assert read_training_log(tmp_path / "training_log.jsonl")[-1]["loss"] == 1.0
    written = draw_all(tmp_path, cc)
    assert {p.name for p in written} == {DENSITY_FILE, SIGNATURE_FILE, SPAN_FILE, CURVES_FILE}
    assert all(p.stat().st_size > 0 for p in written)
    cc.save_pretrained(tmp_path)  # without a model in memory, the folder's model is loaded
    assert len(draw_all(tmp_path)) == 4


def test_missing_files_are_skipped_with_a_message(tmp_path, capsys):
    assert draw_all(tmp_path) == []
    assert main([str(tmp_path)]) == []
    assert "Nothing to plot yet" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not a directory"):
        main([str(tmp_path / "missing")])


def _clt(d_sae: int = 6) -> Crosscoder:
    torch.manual_seed(0)
    mlp_in = [f"blocks.{i}.ln2.hook_normalized" for i in range(3)]
    mlp_out = [f"blocks.{i}.hook_mlp_out" for i in range(3)]
    return Crosscoder(CrosscoderConfig(d_model=4, hook_names_in=mlp_in, hook_names_out=mlp_out, d_sae=d_sae,
                                       layer_structure="cross_layer"))


def test_clt_target_shares_per_source_layer_against_a_loop():
    cc = _clt()
    alive = torch.tensor([True, False, True, True, True, True])
    got = target_shares_by_group(cc, alive)
    # naive: group i = latents [2i, 2i + 2); per latent the norm of its decoder block per target layer
    norms = cc.decoder_norms_per_layer().detach()
    want = torch.zeros(3, 3)
    for i in range(3):
        rows = [s for s in (2 * i, 2 * i + 1) if alive[s]]
        for s in rows:
            want[i] += norms[s] / norms[s].sum() / len(rows)
    torch.testing.assert_close(got, want)
    assert torch.equal(got.tril(-1), torch.zeros(3, 3))  # a CLT's group i writes layers i.. only
    torch.testing.assert_close(got.sum(1), torch.ones(3))


def test_clt_folder_gets_the_target_share_plot(tmp_path):
    density = torch.tensor([0.0, 1e-2, 3e-2, 1e-3, 0.3, 0.1])  # latent 0 dead: left out of the shares
    save_file({"feature_density": density}, str(tmp_path / FEATURE_STATS_FILE))
    written = {p.name for p in draw_all(tmp_path, _clt())}
    assert written == {DENSITY_FILE, SIGNATURE_FILE, SPAN_FILE, TARGET_SHARE_FILE}
