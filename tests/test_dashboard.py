"""dashboard.py: the streaming statistics against brute force, the promoted tokens against a float64
computation, the CLI on a real run folder, and the page in a real headless Chromium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_runner_config
from transformers import AutoModel

from hf_crosscoder import Crosscoder, CrosscoderConfig, LanguageModelCrosscoderTrainingRunner, dashboard
from hf_crosscoder.dashboard import (
    LatentStatsAccumulator,
    collect_latent_stats,
    dashboard_data,
    main,
    promoted_tokens,
    token_label,
    write_dashboard,
)
from hf_crosscoder.data import TokenStream, special_token_ids
from hf_crosscoder.usage import feature_activations

HOOKS_IN = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
HOOKS_OUT = ["blocks.2.hook_resid_post", "blocks.3.hook_resid_post"]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


# ---------------------------------------------------------------- brute force references
def brute_force(feats: torch.Tensor, tokens: torch.Tensor, k: int, before: int, after: int) -> dict:
    """Per latent, from all values at once: count, sum, max, and the k largest positive values with
    their (sequence, position) and token / activation windows."""
    r, s, d_sae = feats.shape
    out = {"count": (feats > 0).sum((0, 1)), "sum": feats.double().sum((0, 1)), "max": feats.amax((0, 1)),
           "top": []}
    for latent in range(d_sae):
        column = feats[..., latent].flatten().tolist()
        order = sorted(range(r * s), key=lambda i: -column[i])
        entries = []
        for i in [i for i in order if column[i] > 0][:k]:
            seq, pos = divmod(i, s)
            window = range(pos - before, pos + after + 1)
            entries.append((column[i], seq, pos, [int(tokens[seq, p]) if 0 <= p < s else -1 for p in window],
                            [float(feats[seq, p, latent]) if 0 <= p < s else 0.0 for p in window]))
        out["top"].append(entries)
    return out


def brute_histogram(values: np.ndarray, n_bins: int) -> tuple[np.ndarray, float]:
    """numpy's histogram of the positive values on [0, 2**e), 2**e the smallest power of two above the max."""
    values = values[values > 0]
    if len(values) == 0:
        return np.zeros(n_bins, dtype=np.int64), 0.0
    hi = 2.0 ** (np.floor(np.log2(values.max())) + 1)
    counts, _ = np.histogram(values, bins=np.linspace(0, hi, n_bins + 1))
    return counts, hi


def check_against_brute_force(stats, feats, tokens, k, before, after, atol=0.0):
    ref = brute_force(feats, tokens, k, before, after)
    assert torch.equal(stats.count, ref["count"])
    torch.testing.assert_close(stats.sum, ref["sum"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.max, ref["max"], rtol=0, atol=atol)
    for latent, entries in enumerate(ref["top"]):
        kept = int((stats.top_seq[latent] >= 0).sum())
        assert kept == len(entries)
        ref_values = torch.tensor([e[0] for e in entries])
        torch.testing.assert_close(stats.top_values[latent, :kept], ref_values, rtol=0, atol=atol)
        for j in range(kept):
            seq, pos = int(stats.top_seq[latent, j]), int(stats.top_pos[latent, j])
            # the recorded place holds the recorded value (ties aside, it is the brute-force place)
            assert abs(float(feats[seq, pos, latent]) - float(stats.top_values[latent, j])) <= atol
            match = [e for e in entries if (e[1], e[2]) == (seq, pos)]
            assert match, (latent, seq, pos)
            assert stats.top_tokens[latent, j].tolist() == match[0][3]
            torch.testing.assert_close(stats.top_acts[latent, j], torch.tensor(match[0][4]), rtol=0, atol=atol)
    return ref


def synthetic(seed: int = 0, r: int = 10, s: int = 16, d_sae: int = 7):
    """Sparse nonnegative latents whose scale grows along the stream (so histogram ranges must widen
    between batches), token ids, and a mask of left-out positions (their latents are zero)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.relu(torch.randn(r, s, d_sae, generator=g) - 0.7)
    feats *= torch.exp(torch.randn(r, s, d_sae, generator=g))
    feats *= 2.0 ** (torch.arange(r, dtype=torch.float32) / 2)[:, None, None]
    counted = torch.rand(r, s, generator=g) > 0.1
    feats *= counted[..., None]
    feats[..., -1] = 0  # a latent that never fires
    return feats, torch.randint(0, 50, (r, s), generator=g), counted


# ---------------------------------------------------------------- (1, 2) streaming statistics
@pytest.mark.parametrize("split", [[10], [3, 3, 4], [1] * 10])
def test_streaming_stats_equal_brute_force_for_any_split(split):
    feats, tokens, counted = synthetic()
    k, before, after, n_bins = 5, 3, 2, 8
    acc = LatentStatsAccumulator(feats.shape[-1], top_k=k, n_bins=n_bins, context_before=before, context_after=after)
    shapes = {name: t.shape for name, t in acc.state_tensors().items()}
    start = 0
    for n in split:
        acc.update(feats[start:start + n], tokens[start:start + n], counted[start:start + n])
        start += n
        # bounded memory: the state is the same set of tensors of the same sizes after every batch
        assert {name: t.shape for name, t in acc.state_tensors().items()} == shapes
    stats = acc.result()
    assert stats.n_tokens == int(counted.sum())
    check_against_brute_force(stats, feats, tokens, k, before, after)
    torch.testing.assert_close(stats.density, stats.count.double() / int(counted.sum()))
    for latent in range(feats.shape[-1]):
        counts, hi = brute_histogram(feats[..., latent].flatten().double().numpy(), n_bins)
        assert stats.hist[latent].tolist() == counts.tolist(), latent
        assert float(stats.hist_range()[latent]) == hi
    assert stats.count[-1] == 0 and (stats.top_seq[-1] == -1).all()


def test_accumulator_refuses_bad_sizes():
    with pytest.raises(ValueError, match="power of two"):
        LatentStatsAccumulator(4, n_bins=12)
    with pytest.raises(ValueError, match="top_k"):
        LatentStatsAccumulator(4, top_k=0)


@pytest.fixture(scope="module")
def random_crosscoder():
    torch.manual_seed(0)
    return Crosscoder(CrosscoderConfig(d_model=64, hook_names_in=HOOKS_IN, hook_names_out=HOOKS_OUT, d_sae=32)).eval()


@pytest.fixture(scope="module")
def eval_tokens(tiny_model_dir, text_dataset_path, tiny_model_and_tokenizer):
    cfg = make_runner_config(tiny_model_dir, text_dataset_path)
    return TokenStream(cfg, tiny_model_and_tokenizer[1], 0, 1).next_batch(6)


def test_collect_on_the_model_equals_brute_force_on_feature_activations(random_crosscoder, tiny_model_and_tokenizer,
                                                                         eval_tokens, monkeypatch):
    model, tokenizer = tiny_model_and_tokenizer
    # one sequence per encoded chunk (as for a wide dictionary): batches and chunks both split the stream
    monkeypatch.setattr(dashboard, "CHUNK_ELEMENTS", eval_tokens.shape[1] * 32)
    special = special_token_ids(tokenizer)
    stats = collect_latent_stats(random_crosscoder, model, [eval_tokens[:2], eval_tokens[2:]], top_k=4,
                                 exclude_token_ids=special, context_before=5, context_after=2)
    # reference: the public per-token latents, special positions left out
    feats = torch.stack([acts for _, acts in feature_activations(random_crosscoder, model, input_ids=eval_tokens)])
    counted = ~torch.isin(eval_tokens, torch.tensor(special))
    feats = feats * counted[..., None]
    assert stats.n_tokens == int(counted.sum()) < eval_tokens.numel()  # BOS positions were there
    assert (stats.count > 0).sum() > 10
    check_against_brute_force(stats, feats, eval_tokens, 4, 5, 2, atol=1e-5)
    # the n_tokens budget stops the stream after the batch that reaches it
    short = collect_latent_stats(random_crosscoder, model, [eval_tokens[:2], eval_tokens[2:]], n_tokens=10)
    assert short.n_tokens == 2 * eval_tokens.shape[1]


# ---------------------------------------------------------------- (3) promoted tokens
def test_promoted_tokens_equal_a_float64_computation(random_crosscoder, tiny_model_and_tokenizer, tiny_model_dir):
    model, _ = tiny_model_and_tokenizer
    latents = torch.tensor([0, 5, 17])
    values, ids = promoted_tokens(random_crosscoder, model, latents, n=10)
    unembed = model.get_output_embeddings().weight.double()
    direct = random_crosscoder.W_dec[latents, -1].double() @ unembed.T  # the last output hook
    ref_values, ref_ids = direct.topk(10, dim=1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(values.double(), ref_values, rtol=1e-5, atol=1e-6)
    encoder = AutoModel.from_pretrained(tiny_model_dir)  # GPTNeoXModel: no unembedding
    assert promoted_tokens(random_crosscoder, encoder, latents) is None


def test_per_model_share_appears_only_for_several_models(random_crosscoder, tiny_model_and_tokenizer, eval_tokens):
    model, tokenizer = tiny_model_and_tokenizer
    stats = collect_latent_stats(random_crosscoder, model, [eval_tokens], top_k=3)
    single = dashboard_data(random_crosscoder, stats, tokenizer, model)
    assert single["columns"]["model_share"] is None and single["model_names"] is None
    # a two-model crosscoder's output rows are (model, hook) pairs, model-major
    torch.manual_seed(1)
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(4)]
    two = Crosscoder(CrosscoderConfig(d_model=64, hook_names_in=HOOKS_IN, hook_names_out=hooks[2:], d_sae=32,
                                      model_names=["base", "chat"])).eval()
    data = dashboard_data(two, stats, tokenizer, model)
    norms = two.W_dec.detach().norm(dim=-1)
    expected = norms[:, :2].sum(1) / norms.sum(1)
    torch.testing.assert_close(torch.tensor(data["columns"]["model_share"][0]), expected, rtol=1e-3, atol=1e-4)
    assert data["model_names"] == ["base", "chat"]


# ---------------------------------------------------------------- (4) the CLI on a real run
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, text_dataset_path):
    out = tmp_path_factory.mktemp("run") / "out"
    cfg = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(out), lr=3e-3,
                             l1_coefficient=0.02, training_tokens=64 * 30)
    LanguageModelCrosscoderTrainingRunner(cfg).run()
    return out


def read_data(index: Path) -> dict:
    text = (index.parent / "data.js").read_text()
    return json.loads(text.removeprefix("window.DASHBOARD_DATA = ").rstrip().removesuffix(";"))


def test_cli_writes_the_dashboard_of_a_run(trained_run, capsys):
    index = main([str(trained_run), "--n_tokens", "320", "--top_k", "5", "--device", "cpu"])
    assert index == trained_run / "dashboard" / "index.html" and index.is_file()
    assert capsys.readouterr().out.strip() == str(index)
    data = read_data(index)
    assert data["d_sae"] == 128 and len(data["columns"]["density"]) == 128
    assert 0 < data["n_tokens"] <= 320  # BOS positions are not counted
    assert data["details"] and all(len(d["contexts"]) <= 5 for d in data["details"].values())
    assert data["hooks_out"] == HOOKS_OUT and data["promoted_hook"] == HOOKS_OUT[-1]
    assert all(len(d["promoted"]) == 10 for d in data["details"].values())
    page = index.read_text()
    assert '<script src="data.js"></script>' in page
    for attribute in ('src="http', "src='http", 'href="http', "url(http", "@import"):
        assert attribute not in page


def test_cli_reads_the_dataset_given_and_checks_it_first(trained_run, tmp_path, capsys):
    words = "the cat sees the green door in the morning"
    corpus = tmp_path / "eval.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{words.capitalize()}."}) + "\n" for _ in range(40)))
    index = main([str(trained_run), "--n_tokens", "128", "--top_k", "3", "--dataset_path", str(corpus),
                  "--device", "cpu"])
    data = read_data(index)
    context_ids = {t for d in data["details"].values() for c in d["contexts"] for t in c["t"]}
    context_words = {data["vocab"][str(t)].strip().lower() for t in context_ids}
    # the contexts come from that corpus (BOS separates its documents)
    assert context_words == set(words.split()) | {".", "<|endoftext|>"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(trained_run), "--dataset_path", str(tmp_path / "missing.jsonl")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: dataset_path") and err.count("\n") == 1, err


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_provenance = tmp_path / "no_provenance"
    Crosscoder(CrosscoderConfig(d_model=8, hook_names_in=HOOKS_IN, hook_names_out=HOOKS_OUT, d_sae=4)
               ).save_pretrained(no_provenance)
    capsys.readouterr()  # (save_pretrained's progress bar)
    cases = [(tmp_path / "missing", "is not a directory"), (empty, "no config.json or model.safetensors"),
             (no_provenance, "names no model_name")]
    for folder, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main([str(folder)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exit_info:
        main([str(no_provenance), "--top_k", "0"])
    assert exit_info.value.code == 2 and "top_k must be positive" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):  # --debug: the exception itself, with its traceback
        main([str(empty), "--debug"])


# ---------------------------------------------------------------- (5) the page in a real browser
def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the playwright package (dev extra) drives Chromium")
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium on this machine and none could be installed (scripts/test.sh installs "
                    "Debian's chromium package when apt-get works)")
    with sync_api.sync_playwright() as p:
        # a fresh profile, and nothing that reaches the network (this machine has none)
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium_profile")), executable_path=executable, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 900})
        yield context
        context.close()


def expected_matches(data: dict, query: str) -> set[int]:
    q = query.lower()
    return {int(i) for i, tokens in data["top_tokens"].items() if any(q in t.lower() for t in tokens)} | (
        {int(q)} if q.isdigit() else set())


def check_search_and_sort(page, data: dict, stats) -> None:
    rows = page.locator("#latents tbody tr")
    # search by a top token: exactly the latents whose top tokens contain it
    query = max((t for tokens in data["top_tokens"].values() for t in tokens), key=len)
    page.fill("#search", query)
    shown = {int(v) for v in rows.evaluate_all("rs => rs.map(r => r.dataset.latent)")}
    assert shown == expected_matches(data, query) and 0 < len(shown) < 128
    page.fill("#search", "7")
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.latent)") == ["7"]
    page.fill("#search", "")
    # sort by max activation: the first row holds the largest
    page.click("#latents th[data-key=max]")
    assert int(rows.first.get_attribute("data-latent")) == int(stats.max.argmax())


def test_page_in_headless_chromium(browser, trained_run, tiny_model_and_tokenizer, tiny_model_dir,
                                   text_dataset_path, tmp_path):
    model, tokenizer = tiny_model_and_tokenizer
    crosscoder = Crosscoder.from_pretrained(trained_run).eval()
    stream = TokenStream(make_runner_config(tiny_model_dir, text_dataset_path), tokenizer, 0, 1)
    stats = collect_latent_stats(crosscoder, model, [stream.next_batch(10)], top_k=6,
                                 exclude_token_ids=special_token_ids(tokenizer))
    index = write_dashboard(tmp_path / "site", crosscoder, stats, tokenizer, model)
    data = read_data(index)
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(index.as_uri())
    rows = page.locator("#latents tbody tr")
    rows.first.wait_for()
    assert page.inner_text("#count") == "128 of 128 latents"

    check_search_and_sort(page, data, stats)

    # open the latent with the most firing tokens; its contexts are the collected ones
    latent = int(stats.count.argmax())
    page.fill("#search", str(latent))
    page.click(f"#latents tbody tr[data-latent='{latent}']")
    page.wait_for_url(f"**#latent={latent}")
    contexts = page.locator("#contexts .ctx")
    assert contexts.count() == int((stats.top_seq[latent] >= 0).sum()) == 6
    for j in range(contexts.count()):
        ids = stats.top_tokens[latent, j]
        expected = [token_label(tokenizer, t) for t in ids[ids >= 0].tolist()]
        tokens = contexts.nth(j).locator(".tok")
        assert tokens.all_inner_texts() == expected
        acts = [float(a) for a in tokens.evaluate_all("ts => ts.map(t => t.dataset.act)")]
        # the page carries 3 significant digits
        np.testing.assert_allclose(acts, stats.top_acts[latent, j][ids >= 0].numpy(), rtol=5e-3, atol=1e-6)
        peak = contexts.nth(j).locator(".tok.peak").inner_text()
        assert peak == token_label(tokenizer, int(ids[stats.context_before]))
    # the histogram's bars: its bins up to the last nonzero one, each titled with its count
    bars = page.locator("#histogram rect title").evaluate_all("ts => ts.map(t => t.textContent)")
    last = int(stats.hist[latent].nonzero().max())
    assert [int(b.split()[0]) for b in bars] == stats.hist[latent, :last + 1].tolist()
    assert page.locator("#promoted .chip").count() == 10
    assert page.locator(".bar-row").count() == len(HOOKS_OUT)

    # a link opens a latent directly
    other = int(data["columns"]["density"].index(max(data["columns"]["density"])))
    page.goto(index.as_uri() + f"#latent={other}")
    page.locator("#detail h2").wait_for()
    assert page.inner_text("#detail h2") == f"Latent {other}"
    screenshot = tmp_path / "dashboard.png"
    page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 10_000
    assert requests and all(url.startswith("file://") for url in requests), requests
    page.close()


def test_page_shows_per_model_shares_of_a_two_model_crosscoder(browser, random_crosscoder, tiny_model_and_tokenizer,
                                                               eval_tokens, tmp_path):
    model, tokenizer = tiny_model_and_tokenizer
    stats = collect_latent_stats(random_crosscoder, model, [eval_tokens], top_k=3)
    torch.manual_seed(1)
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(4)]
    two = Crosscoder(CrosscoderConfig(d_model=64, hook_names_in=HOOKS_IN, hook_names_out=hooks[2:], d_sae=32,
                                      model_names=["base", "chat"])).eval()
    index = write_dashboard(tmp_path, two, stats, tokenizer, model)
    share = read_data(index)["columns"]["model_share"][0]
    page = browser.new_page()
    page.goto(index.as_uri())
    page.locator("#latents tbody tr").first.wait_for()
    headers = page.locator("#latents th").all_inner_texts()
    assert [h.strip() for h in headers[4:6]] == ["share base", "share chat"]
    page.click("#latents th[data-key=share0]")
    first = int(page.locator("#latents tbody tr").first.get_attribute("data-latent"))
    assert share[first] == max(share)
    page.click("#latents tbody tr >> nth=0")
    page.locator("#detail h2").wait_for()
    assert page.locator(".bar-row").count() == 4 + 2  # per output row, then per model
    page.close()
