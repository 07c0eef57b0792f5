"""Using a crosscoder on its model: feature activations per token, and splicing reconstructions in."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from hf_crosscoder import Crosscoder, CrosscoderConfig
from hf_crosscoder.hooks import capture_activations, splice
from hf_crosscoder.usage import feature_activations, spliced

L0, L1, L2 = (f"blocks.{i}.hook_resid_post" for i in range(3))


@pytest.fixture(scope="module")
def lm() -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    config = GPTNeoXConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                           vocab_size=100)
    return GPTNeoXForCausalLM(config).eval()


def crosscoder(hooks_in: list[str], hooks_out: list[str], seed: int = 0, **kwargs) -> Crosscoder:
    torch.manual_seed(seed)
    cc = Crosscoder(CrosscoderConfig(d_model=32, d_sae=64, hook_names_in=hooks_in, hook_names_out=hooks_out,
                                     **kwargs))
    with torch.no_grad():
        cc.b_enc.fill_(0.05)  # enough latents fire for a visible reconstruction
    return cc.eval()


def ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


class StubTokenizer:
    """The three things feature_activations uses: __call__, convert_ids_to_tokens, pad_token_id."""

    pad_token_id = None

    def __call__(self, text: str) -> dict:
        return {"input_ids": [ord(c) % 100 for c in text]}

    def convert_ids_to_tokens(self, row: list[int]) -> list[str]:
        return [f"t{i}" for i in row]


def test_feature_activations_equal_encode_of_captured(lm):
    cc = crosscoder([L0, L1], [L0, L1])
    input_ids = ids()
    results = feature_activations(cc, lm, input_ids=input_ids)
    acts = capture_activations(lm, [L0, L1], input_ids)
    expected = cc.encode(torch.stack([acts[L0], acts[L1]], dim=2).flatten(0, 1)).view(2, 7, -1)
    assert len(results) == 2
    for i, (tokens, feats) in enumerate(results):
        assert torch.equal(tokens, input_ids[i]) and feats.shape == (7, 64)
        torch.testing.assert_close(feats, expected[i])
    assert (expected > 0).any()


def test_feature_activations_drop_padding_and_take_texts(lm):
    cc = crosscoder([L1], [L1])
    input_ids = ids(2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    (_, full), (short_tokens, short) = feature_activations(cc, lm, input_ids=input_ids, attention_mask=mask)
    assert full.shape == (6, 64) and short.shape == (3, 64) and short_tokens.tolist() == input_ids[1, :3].tolist()
    alone = feature_activations(cc, lm, input_ids=input_ids[1:, :3])[0][1]
    torch.testing.assert_close(short, alone)  # right padding leaves real tokens untouched
    [(tokens, feats)] = feature_activations(cc, lm, StubTokenizer(), texts=["hello"])
    assert tokens == [f"t{ord(c) % 100}" for c in "hello"] and feats.shape == (5, 64)
    with pytest.raises(ValueError, match="tokenizer"):
        feature_activations(cc, lm, texts=["no tokenizer"])


def test_feature_activations_loads_model_by_name(lm, tmp_path):
    lm.save_pretrained(tmp_path)
    cc = crosscoder([L0], [L0], model_name=str(tmp_path))
    by_name = feature_activations(cc, input_ids=ids(1, 5))  # model from config.model_name
    by_object = feature_activations(cc, lm, input_ids=ids(1, 5))
    torch.testing.assert_close(by_name[0][1], by_object[0][1])


@pytest.mark.parametrize("hook_in,hook_out", [(L0, L1), (L1, L1)])  # transcoder, SAE
def test_spliced_equals_manual_replacement(lm, hook_in, hook_out):
    cc = crosscoder([hook_in], [hook_out])
    input_ids = ids()
    with torch.no_grad():
        clean = lm(input_ids).logits
        with spliced(cc, lm):
            logits = lm(input_ids).logits
            again = lm(input_ids).logits  # state resets between forwards
        x = capture_activations(lm, [hook_in], input_ids)[hook_in]
        recon = cc(x.flatten(0, 1)).reconstruction.view(2, 7, 32)
        with splice(lm, {hook_out: lambda act: recon}):
            manual = lm(input_ids).logits
        after = lm(input_ids).logits
    assert not torch.allclose(logits, clean)
    torch.testing.assert_close(logits, manual)
    torch.testing.assert_close(again, logits)
    torch.testing.assert_close(after, clean)  # hooks removed on exit


def test_spliced_causal_multi_output(lm):
    cc = crosscoder([L0, L1], [L1, L2], seed=3)
    input_ids = ids()
    with torch.no_grad():
        acts = capture_activations(lm, [L0, L1], input_ids)
        recon = cc(torch.stack([acts[L0], acts[L1]], dim=2).flatten(0, 1)).reconstruction.view(2, 7, 2, 32)
        with splice(lm, {L1: lambda act: recon[:, :, 0], L2: lambda act: recon[:, :, 1]}):
            manual = lm(input_ids).logits
        with spliced(cc, lm):
            logits = lm(input_ids).logits
    torch.testing.assert_close(logits, manual)


def test_spliced_acausal_raises(lm):
    cc = crosscoder([L0, L1], [L0, L1])
    with spliced(cc, lm), pytest.raises(ValueError, match="before input hook"):
        lm(ids())
    lm(ids())  # hooks are gone after the error


def test_feature_activations_with_model_name_and_real_tokenizer(tiny_model_dir):
    hook = "blocks.1.hook_resid_post"
    torch.manual_seed(0)
    cc = Crosscoder(CrosscoderConfig(d_model=64, d_sae=32, hook_names_in=[hook], hook_names_out=[hook],
                                     model_name=tiny_model_dir)).eval()
    texts = ["the cat sees a red ball today", "a bird"]
    results = feature_activations(cc, texts=texts)  # model and tokenizer loaded from config.model_name
    assert [tokens for tokens, _ in results] == [text.split() for text in texts]
    assert [feats.shape for _, feats in results] == [(7, 32), (2, 32)]
    torch.testing.assert_close(results[1][1], feature_activations(cc, texts=texts[1:])[0][1])  # padding-free
