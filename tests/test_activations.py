import copy
import math
import re

import pytest
import torch
from helpers import D_MODEL, make_runner_config
from transformers import AutoModelForCausalLM

from hf_crosscoder.activations import ActivationsStore, buffer_batches, per_process_batch_size
from hf_crosscoder.data import special_token_mask
from hf_crosscoder.harvest import load_model_and_tokenizer
from hf_crosscoder.hooks import capture_activations

B = 64  # train_batch_size_tokens of make_runner_config (one process)


@pytest.fixture
def cfg(tiny_model_dir, text_dataset_path, tmp_path):
    def make(**overrides):
        return make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(tmp_path), **overrides)
    return make


def _spy_harvest(store, tag=False):
    """Record (tokens, raw activations, special mask) of every harvest chunk, all positions (the store
    gets the non-special ones when it drops special tokens, as from the real harvester). With `tag`, the served
    activations are replaced by labels: row r of the harvest stream, hook h -> r + h / 8 everywhere
    (identical contexts give identical real activations, so values alone cannot tell rows apart)."""
    records, harvest = [], store.source.harvester

    class Spy:
        device = harvest.device

        def __call__(self, tokens, drop_special=False):
            acts, special = harvest(tokens)
            records.append((tokens.clone(), acts.clone(), special.clone()))
            if tag:
                start = sum(len(r[2]) for r in records[:-1])
                labels = torch.arange(start, start + len(acts))[:, None] + torch.arange(acts.shape[1]) / 8
                acts = labels[:, :, None].expand_as(acts).contiguous()
            return (acts[~special], special[~special]) if drop_special else (acts, special)
    store.source.harvester = Spy()
    return records


def _served_rows(batches):
    """Harvest-stream row of each served token; checks every hook of a token comes from that row."""
    rows = []
    for acts_in, acts_out in batches:
        labels = torch.cat([acts_in, acts_out], 1)[:, :, 0]
        row = labels[:, 0].floor()
        assert torch.equal(labels, row[:, None] + torch.tensor([0, 1, 2, 3]) / 8)  # in and out: same token
        rows.append(row.long())
    return torch.cat(rows)


def test_shapes_dtype_and_every_row_served_once(cfg):
    store = ActivationsStore(cfg(normalize_activations="none"))
    records = _spy_harvest(store, tag=True)
    batches = [store.next_batch() for _ in range(12)]
    for acts_in, acts_out in batches:
        assert acts_in.shape == (B, 2, D_MODEL) and acts_out.shape == (B, 2, D_MODEL)
        assert acts_in.dtype == torch.float32 and acts_in.device.type == "cpu"
    served = _served_rows(batches)
    special = torch.cat([s for _, _, s in records])
    # 12 batches = 6 cycles of 2: the first fill (256 rows), 5 refills of half the buffer, < 1 chunk carried
    assert 256 + 5 * 128 <= int((~special).sum()) < 256 + 5 * 128 + 128
    assert len(served.unique()) == len(served) == 12 * B  # no row served twice
    assert not special[served].any()  # BOS rows are never served


def _reference_batches(store, tokens, n_batches):
    """What the store must serve, computed plainly: raw activations of every harvested token row (stacked,
    special positions masked out if excluded) in one stream, a buffer (re)filled by assignment from that
    stream, and each batch gathered with all hooks, scaled, then split into inputs and outputs."""
    cfg, hooks = store.cfg, store.hook_names
    acts = [torch.stack(list(capture_activations(store.model, hooks, t).values()), 2).flatten(0, 1) for t in tokens]
    special = [special_token_mask(t, store.tokenizer).flatten() for t in tokens]
    stream = torch.cat([a[~s] if cfg.exclude_special_tokens else a for a, s in zip(acts, special)])
    generator = torch.Generator().manual_seed(cfg.seed)
    buffer, used, batches = torch.empty(store.buffer_rows, len(hooks), cfg.d_model), 0, []
    free, half = torch.arange(store.buffer_rows), cfg.n_batches_in_buffer // 2 * store.batch_size
    while len(batches) < n_batches:
        buffer[free] = stream[used:used + len(free)]
        used += len(free)
        order = torch.randperm(store.buffer_rows, generator=generator)[:half]
        for start in range(0, half, store.batch_size):
            served = buffer[order[start:start + store.batch_size]] * store.estimate_norm_scaling()[:, None]
            batches.append((served[:, store._in_index], served[:, store._out_index]))
        free = order.sort().values  # refill what was served
    return batches[:n_batches]


@pytest.mark.parametrize("exclude_special_tokens", [True, False])
def test_served_batches_equal_a_plain_reference(cfg, exclude_special_tokens):
    # the store's chunked fill (non-special rows gathered hook by hook, index_copy_ into the free slots,
    # the rest of a chunk carried to the next fill) and its per-side gathers serve exactly these values;
    # n_batches_in_buffer=3: refills of 64 rows against chunks of up to 128, so most fills use a carry
    store = ActivationsStore(cfg(n_batches_in_buffer=3, exclude_special_tokens=exclude_special_tokens))
    tokens, next_tokens = [], store.source.tokens.next_batch  # record the token rows; the real harvester runs
    store.source.tokens.next_batch = lambda n: tokens.append(next_tokens(n)) or tokens[-1]
    got = [store.next_batch() for _ in range(10)]
    want = _reference_batches(store, tokens, len(got))
    for (got_in, got_out), (want_in, want_out) in zip(got, want):
        assert torch.equal(got_in, want_in) and torch.equal(got_out, want_out)


def test_batches_mix_documents(cfg, tiny_model_and_tokenizer):
    store = ActivationsStore(cfg(normalize_activations="none"))
    records = _spy_harvest(store, tag=True)
    served = _served_rows([store.next_batch()])
    tokens = torch.cat([t for t, _, _ in records])  # [n_seq, ctx]
    seq, pos = served // tokens.shape[1], served % tokens.shape[1]
    bos = tiny_model_and_tokenizer[1].bos_token_id
    docs = {(int(s), int((tokens[s, :p + 1] == bos).sum())) for s, p in zip(seq, pos)}
    assert len(set(seq.tolist())) >= 4 and len(docs) >= 10
    assert not bool((served.diff() > 0).all())  # not in stream order


def test_normalization_gives_mean_norm_sqrt_d_model(cfg):
    store = ActivationsStore(cfg())
    records = _spy_harvest(store)
    acts_in, acts_out = zip(*[store.next_batch() for _ in range(4)])
    norms = torch.cat([torch.cat([a, b], 1) for a, b in zip(acts_in, acts_out)]).norm(dim=-1).mean(0)
    torch.testing.assert_close(norms, torch.full((4,), math.sqrt(D_MODEL)), rtol=0.05, atol=0)
    # the scale comes from the first n_batches_for_norm_estimate chunks, BOS positions left out
    first = torch.cat([a[~s] for _, a, s in records[:2]])
    expected = math.sqrt(D_MODEL) / first.norm(dim=-1).mean(0)
    torch.testing.assert_close(torch.cat([store.scale_in, store.scale_out]), expected.float())
    assert store.scale_in.shape == (2,) and (store.scale_in > 1).all()  # random init: small norms


@pytest.mark.parametrize("normalize", ["none", "expected_average"])
def test_mean_out_is_the_normalized_mean_of_the_first_buffer(cfg, normalize):
    store = ActivationsStore(cfg(normalize_activations=normalize))
    records = _spy_harvest(store)
    mean = store.mean_out()
    # what b_dec starts at: each output hook's mean over the first buffer's rows (BOS rows left out), scaled
    rows = torch.cat([a[~s] for _, a, s in records]).double()[:store.buffer_rows]
    want = rows[:, store._out_index].mean(0) * store.scale_out.double()[:, None]
    torch.testing.assert_close(mean, want.float())
    n_harvests = len(records)
    store.next_batch()  # nothing was consumed: serving starts from that same buffer, no new harvest
    assert len(records) == n_harvests


def test_default_buffer_holds_twenty_harvests_and_small_buffers_warn(cfg, caplog):
    c = cfg(n_batches_in_buffer=None)  # make_runner_config's tiny shapes: 20 harvests of 4 x 32 tokens = 2560 rows of batch 64
    assert c.n_batches_in_buffer is None
    assert buffer_batches(c, 64) == 40 and buffer_batches(c, 1000) == 20 and buffer_batches(c, 100) == 26
    assert buffer_batches(cfg(n_batches_in_buffer=3), 64) == 3
    with caplog.at_level("WARNING", logger="hf_crosscoder.activations"):
        ActivationsStore(cfg(n_batches_in_buffer=4))
    assert "raise n_batches_in_buffer" in caplog.text.lower() and "sequences" in caplog.text


def test_hook_both_input_and_output_is_stored_once(cfg):
    store = ActivationsStore(cfg(hook_names_in=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
                                 hook_names_out=["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]))
    assert store.hook_names == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
                                "blocks.3.hook_resid_post"]
    acts_in, acts_out = store.next_batch()
    assert torch.equal(acts_in[:, 1], acts_out[:, 0])
    assert torch.equal(store.scale_in[1], store.scale_out[0])


def test_tokens_and_activations_from_tokens_for_evals(cfg):
    store = ActivationsStore(cfg())
    tokens = store.next_tokens()
    assert tokens.shape == (4, 32) and tokens.dtype == torch.long
    acts_in, acts_out, keep = store.activations_from_tokens(tokens)
    assert acts_in.shape == (128, 2, D_MODEL) and acts_out.shape == (128, 2, D_MODEL)
    assert keep.dtype == torch.bool and torch.equal(keep, tokens.flatten() != store.tokenizer.bos_token_id)


def test_save_load_resumes_the_same_stream(cfg, tmp_path):
    config = cfg(n_batches_in_buffer=3)  # odd: half the buffer is one batch
    reference = ActivationsStore(config)
    expected = [reference.next_batch() for _ in range(9)]
    first = ActivationsStore(config)
    for _ in range(4):
        first.next_batch()
    first.save(tmp_path / "state")
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        "activations_store.json", "activations_store.safetensors"]
    resumed = ActivationsStore(config)
    resumed.load(tmp_path / "state")
    for want in expected[4:]:
        got = resumed.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    other = ActivationsStore(cfg(train_batch_size_tokens=32))
    with pytest.raises(ValueError, match="Resume with the same hook names, train_batch_size_tokens"):
        other.load(tmp_path / "state")
    with pytest.raises(ValueError, match="cannot read the activations-store state"):
        other.load(tmp_path / "nowhere")


def test_d_model_mismatch_raises_before_weights_load(cfg, monkeypatch):
    calls = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: calls.append(a))
    config = cfg(d_model=32)
    with pytest.raises(ValueError, match=rf"d_model=32 does not match the hidden size 64 of {config.model_name}; "
                                         r"set d_model=64 \(pythia-70m: 512, pythia-160m: 768\)"):
        ActivationsStore(config)
    with pytest.raises(ValueError, match="context_size=512 exceeds the 256 positions"):
        load_model_and_tokenizer(cfg(context_size=512))
    with pytest.raises(ValueError, match="model_class_name='AutoModelForMagic' is not a transformers"):
        load_model_and_tokenizer(cfg(model_class_name="AutoModelForMagic"))
    assert calls == []


def test_user_errors_are_clear(cfg, tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    with pytest.raises(ValueError, match="pass tokenizer= too"):
        ActivationsStore(cfg(), model=model)
    with pytest.raises(ValueError, match="Unknown hook name 'blocks.1.resid'"):
        ActivationsStore(cfg(hook_names_in=["blocks.1.resid"]), model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="not divisible by the 3 processes; use a multiple of 3"):
        per_process_batch_size(64, 3)


@pytest.mark.parametrize("dtype, fix", [(torch.float32, "check the model's weights"),
                                        (torch.bfloat16, "load the model with dtype='float32'")])
def test_nan_activations_name_the_hook(cfg, tiny_model_and_tokenizer, dtype, fix):
    # the fix named depends on the dtype: a float32 model producing NaN has bad weights or inputs
    model, tokenizer = tiny_model_and_tokenizer
    model = copy.deepcopy(model).to(dtype)
    store = ActivationsStore(cfg(), model=model, tokenizer=tokenizer)
    handle = model.gpt_neox.layers[1].register_forward_hook(lambda m, a, out: torch.full_like(out, math.nan))
    with pytest.raises(ValueError, match=r"hook\(s\) \['blocks.1.hook_resid_post'.*NaN/inf.*" + re.escape(fix)):
        store.next_batch()
    handle.remove()


def test_hook_of_another_width_is_refused(cfg, tiny_model_and_tokenizer):
    # a raw module path can name a module that does not write the residual stream (an MLP up-projection)
    model, tokenizer = tiny_model_and_tokenizer
    store = ActivationsStore(cfg(hook_names_in=["gpt_neox.layers.0.mlp.dense_h_to_4h"]), model=model,
                             tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"'gpt_neox.layers.0.mlp.dense_h_to_4h': 128.*d_model=64"):
        store.next_batch()
