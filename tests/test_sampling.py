"""Sampling with a KV cache: cached decoding equals recomputing the whole sequence each step.

Stop strings are watched on a window of each row's newest tokens; the oracle for that is the plain loop
that decodes the whole answer after every token (reference_stops below), run on scripted token streams
through a SentencePiece tokenizer with byte-fallback pieces."""
import random
from collections import deque
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from toy import world
from model import sampling
from model.config import PRESETS
from model.llama import KVCache, Llama
from model.sampling import generate, left_pad, sample_next
from model.tokenizer import Tokenizer, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


class CharTokenizer:
    """Decodes id i as the letter chr(97 + i % 26): enough to exercise stop strings."""

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Llama(replace(PRESETS["tiny"], vocab_size=64, num_hidden_layers=2, hidden_size=64,
                      num_attention_heads=4, num_key_value_heads=4, intermediate_size=128))
    m.init_weights(seed=1, std=0.3)  # large weights: a peaked, prompt-dependent next-token distribution
    return m.eval()


PROMPTS = [[1, 5, 9, 33, 2, 7], [1, 40], [1, 3, 3, 3, 11, 12, 13, 14, 15]]


def test_cached_greedy_decoding_equals_full_recomputation(model):
    cached = generate(model, PROMPTS, 12)
    full = generate(model, PROMPTS, 12, use_cache=False)
    assert [c.tokens for c in cached] == [c.tokens for c in full]
    assert all(len(c.tokens) == 12 and c.finish_reason == "length" for c in cached)


def test_cached_sampling_equals_full_recomputation_with_the_same_seed(model):
    kw = dict(temperature=0.9, top_p=0.9)
    cached = generate(model, PROMPTS, 10, generator=torch.Generator().manual_seed(3), **kw)
    full = generate(model, PROMPTS, 10, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert [c.tokens for c in cached] == [c.tokens for c in full]


def test_left_padded_batch_continues_each_prompt_as_if_alone(model):
    batch = generate(model, PROMPTS, 8)
    for p, c in zip(PROMPTS, batch):
        assert generate(model, [p], 8)[0].tokens == c.tokens


def test_greedy_tokens_are_the_argmax_of_the_full_forward(model):
    tokens = generate(model, [PROMPTS[0]], 5)[0].tokens
    seq = list(PROMPTS[0])
    for t in tokens:
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0, -1]
        assert t == int(logits.argmax())
        seq.append(t)


def test_eos_ends_a_row_and_is_not_returned(model):
    first = generate(model, [PROMPTS[0]], 1)[0].tokens[0]
    out = generate(model, [PROMPTS[0], PROMPTS[1]], 6, eos_id=first)
    assert out[0].tokens == [] and out[0].finish_reason == "eos"
    assert first not in out[1].tokens and out[1].finish_reason in ("eos", "length")


def finishing_at_different_steps(model):
    """16 prompts and an eos id that ends their greedy answers at different steps (some never): the batch
    loses rows as it runs."""
    prompts = [[1] + [(7 * i + 3 * j) % 60 + 3 for j in range(1 + i % 5)] for i in range(16)]
    free = generate(model, prompts, 12)
    counts = {}
    for c in free:
        for t in set(c.tokens[1:]):
            counts[t] = counts.get(t, 0) + 1
    eos = max(counts, key=counts.get)                   # a token most answers reach sooner or later
    return prompts, free, eos


def test_rows_that_finish_leave_the_batch_and_the_rest_go_on_as_if_alone(model, monkeypatch):
    prompts, free, eos = finishing_at_different_steps(model)
    kept = []
    original = KVCache.keep_rows
    monkeypatch.setattr(KVCache, "keep_rows", lambda self, rows: (kept.append(len(rows)), original(self, rows)))
    out = generate(model, prompts, 12, eos_id=eos)
    assert len(kept) >= 2 and kept[-1] <= len(prompts) // 2     # the batch really shrank, more than once
    for c, f in zip(out, free):                                 # each row: its free answer cut at the first eos
        cut = f.tokens.index(eos) if eos in f.tokens else len(f.tokens)
        assert c.tokens == f.tokens[:cut]
        assert c.finish_reason == ("eos" if eos in f.tokens else "length")
    for p, c in zip(prompts, out):
        assert generate(model, [p], 12, eos_id=eos)[0].tokens == c.tokens


def test_sampling_with_rows_leaving_equals_full_recomputation(model):
    prompts, _, eos = finishing_at_different_steps(model)
    kw = dict(temperature=0.9, top_p=0.9, eos_id=eos)
    cached = generate(model, prompts, 12, generator=torch.Generator().manual_seed(3), **kw)
    full = generate(model, prompts, 12, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert [c.tokens for c in cached] == [c.tokens for c in full]
    assert len({len(c.tokens) for c in cached}) > 2             # rows did finish at different steps


def test_stop_string_ends_a_row_and_cuts_the_text(model):
    tok = CharTokenizer()
    free = generate(model, [PROMPTS[2]], 10, tokenizer=tok)[0]
    stop = free.text[3:5]                      # a string the free-running text is known to contain
    out = generate(model, [PROMPTS[2]], 10, tokenizer=tok, stop_strings=[stop])[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[:free.text.index(stop)]
    assert stop in tok.decode(out.tokens) and stop not in tok.decode(out.tokens[:-1])


def test_top_p_keeps_only_the_smallest_prefix_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: with top_p 0.7 the nucleus is {0, 1} (0.5 < 0.7 <= 0.8)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(400, 4)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_p=0.7, generator=g)
    assert set(draws.tolist()) == {0, 1}
    # renormalised nucleus: P(0) = 0.5 / 0.8 = 0.625; 400 draws put the count within ±5σ (σ ≈ 9.7)
    assert abs(int((draws == 0).sum()) - 250) < 50
    assert set(sample_next(logits, 1.0, 0.5, g).tolist()) == {0}


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 17)
    assert torch.equal(sample_next(logits, 0.0, 1.0), logits.argmax(-1))


def test_left_pad_right_aligns_prompts():
    ids, mask = left_pad([[4, 5, 6], [7]], pad_id=0, device="cpu")
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_bad_arguments_are_refused(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 3, top_p=0.0)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, [[1]], 3, stop_strings=["x"])


# --- Stop strings on a window of the newest tokens equal the whole-answer search -------------------------

def reference_stops(streams, eos_id, stop_strings, tokenizer):
    """The oracle: generate's stopping as it was, decoding each row's whole answer after every token.
    Returns (tokens, text, finish_reason) per row."""
    out = []
    for stream in streams:
        new, reason = [], None
        for t in stream:
            if eos_id is not None and t == eos_id:
                reason = "eos"
                break
            new.append(t)
            if any(s in tokenizer.decode(new) for s in stop_strings):
                reason = "stop"
                break
        text = tokenizer.decode(new)
        for s in stop_strings:
            text = text.split(s)[0]
        out.append((new, text, reason or "length"))
    return out


class ScriptedModel(torch.nn.Module):
    """Stands in for a Llama in generate: greedy decoding of row i's one-token prompt [i + 3] yields
    script[i][k] as its k-th new token (hidden state = one-hot of that token, lm_head = identity). The row is
    read from the prompt token (no cache: every step sees it) or from the cache, which follows generate's
    dropping of finished rows (keep_rows) as the real KVCache does."""

    def __init__(self, script, vocab_size):
        super().__init__()
        self.script = torch.tensor(script)                                      # [B, N]
        self.config = SimpleNamespace(pad_token_id=0, max_position_embeddings=10_000)
        self.lm_head = torch.nn.Linear(vocab_size, vocab_size, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.eye(vocab_size))

    def new_cache(self, batch_size, max_len):
        cache = SimpleNamespace(length=0, rows=None)
        cache.keep_rows = lambda rows: setattr(cache, "rows", cache.rows[rows])
        return cache

    def hidden_states(self, input_ids, attention_mask=None, cache=None):
        S = input_ids.shape[1] + (cache.length if cache is not None else 0)     # tokens seen, prompt's 1 first
        if cache is None:
            rows = input_ids[:, 0] - 3
        else:
            if cache.length == 0:
                cache.rows = input_ids[:, 0] - 3
            rows, cache.length = cache.rows, S
        return torch.nn.functional.one_hot(self.script[rows, S - 1], self.lm_head.in_features).float()[:, None]


def generate_scripted(streams, tokenizer, **kw):
    """generate() run on ScriptedModel(streams): (tokens, text, finish_reason) per row."""
    model = ScriptedModel(streams, tokenizer.vocab_size)
    out = generate(model, [[i + 3] for i in range(len(streams))], len(streams[0]), tokenizer=tokenizer, **kw)
    return [(c.tokens, c.text, c.finish_reason) for c in out]


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    """A byte-fallback SentencePiece model of the project's kind: accented letters seen in training get
    pieces; ñ, ß, CJK and emoji do not, and are encoded as their UTF-8 bytes."""
    texts = world.pretraining_text(300, 0) + ["café crème naïve über"] * 5
    tok = Tokenizer(train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "sp", vocab_size=384))
    assert any(tok.sp.is_byte(i) for i in tok.encode("東京 😀", bos=False))
    assert not any(tok.sp.is_byte(i) for i in tok.encode("café", bos=False))
    return tok


PARTS = ("cat", "the", " cat", " is", " plus ", "7", "12", ".", " ", "  ", "\n", "é", "ü", "naïve", "ñ", "ß",
         "東京", "日本語", "😀", "🎉", " 😀", "a", "b")


def random_stream(rng, tok, n, eos_rate=0.0):
    """n token ids: encoded random text, with tokens that decode to nothing on their own (BOS, pad, EOS,
    a bare "▁") and lone byte pieces (cutting or forging UTF-8 characters) sprinkled in."""
    text = "".join(rng.choice(PARTS) for _ in range(n))
    bare_space = tok.sp.piece_to_id("▁")
    byte_ids = [i for i in range(tok.vocab_size) if tok.sp.is_byte(i) and i - 3 >= 0x80]
    out = []
    for t in tok.encode(text, bos=False):
        r = rng.random()
        if r < 0.10:
            out += [rng.choice([tok.bos_id, tok.pad_id, tok.eos_id])] * rng.randint(1, 4)
        elif r < 0.14:
            out.append(bare_space)
        elif r < 0.17:
            out.append(rng.choice(byte_ids))
        if rng.random() < eos_rate:
            out.append(tok.eos_id)
        out.append(t)
    return out[:n]


def random_stop_strings(rng, tok, stream):
    """Three stop strings the stream's text is likely to contain late: pieces of the decoded text near the
    end of a random prefix, one of them starting at a space, up to 6 characters."""
    stops = []
    while len(stops) < 3:
        text = tok.decode(stream[:rng.randint(len(stream) // 2, len(stream))])
        L = rng.randint(1, 6)
        if len(stops) == 0 and " " in text[len(text) // 2:]:
            start = rng.choice([j for j, c in enumerate(text) if c == " " and j >= len(text) // 2])
        else:
            start = max(0, len(text) - L - rng.randint(0, 3))
        if text[start:start + L]:
            stops.append(text[start:start + L])
    return stops


def compare_with_reference(tok, trials, seed, eos_id=None, use_cache=True):
    """Runs `trials` random batches of 4 rows through generate and the oracle; returns the mismatches and
    how many rows stopped at a stop string after the window had left their first token behind."""
    rng = random.Random(seed)
    mismatches, late_stops = [], 0
    for _ in range(trials):
        streams = [random_stream(rng, tok, 60, eos_rate=0.01 if eos_id is not None else 0.0) for _ in range(4)]
        stops = random_stop_strings(rng, tok, rng.choice(streams))
        got = generate_scripted(streams, tok, eos_id=eos_id, stop_strings=stops, use_cache=use_cache)
        want = reference_stops(streams, eos_id, stops, tok)
        if got != want:
            mismatches.append((streams, stops, got, want))
        window = 4 * max(map(len, stops)) + 1
        late_stops += sum(r == "stop" and len(t) > window for t, _, r in want)
    return mismatches, late_stops


@pytest.mark.parametrize("seed, eos_id, use_cache", [(0, None, True), (1, 2, True), (2, None, False)],
                         ids=["no-eos", "eos", "no-cache"])
def test_windowed_stop_strings_equal_the_whole_answer_search(sp_tok, seed, eos_id, use_cache):
    mismatches, late_stops = compare_with_reference(sp_tok, 60, seed, eos_id=eos_id, use_cache=use_cache)
    assert not mismatches, mismatches[0]
    assert late_stops >= 10          # the window really slid: many hits came long after the first token


def test_a_window_too_short_is_caught(sp_tok, monkeypatch):
    """The random cases are sharp enough: one token per character (too few for byte pieces and the
    tokens that decode to nothing) makes generate disagree with the oracle."""
    init = sampling.StopStringWatch.__init__

    def too_short(self, *args):
        init(self, *args)
        self.window = max(map(len, self.stop_strings))
        self.shown = [deque(maxlen=self.window) for _ in self.shown]

    monkeypatch.setattr(sampling.StopStringWatch, "__init__", too_short)
    mismatches, _ = compare_with_reference(sp_tok, 60, seed=0)
    assert mismatches


def test_stop_string_across_byte_pieces_and_many_silent_tokens(sp_tok):
    """"😀😀" is 8 byte pieces; with 5 BOS/pad ids after each it spans 48 tokens, far more than 4·L + 2,
    but the ids that decode to nothing are not counted. The window must take them all in."""
    tok = sp_tok
    lead = tok.encode("the cat is", bos=False)
    emoji = tok.encode("😀😀", bos=False)[-8:]
    assert all(tok.sp.is_byte(i) for i in emoji)
    silent = [tok.bos_id, tok.pad_id] * 2 + [tok.bos_id]
    stream = lead + [t for b in emoji for t in [b] + silent] + tok.encode(" more", bos=False)
    got = generate_scripted([stream], tok, stop_strings=["s😀😀", "😀😀"])
    assert got == reference_stops([stream], None, ["s😀😀", "😀😀"], tok)
    assert got[0][2] == "stop" and got[0][1] == "the cat i"       # cut before the first stop string, "s😀😀"


def test_stop_string_starting_with_a_space(sp_tok):
    """A piece like "▁cat" first in a decode loses its space: the window must start before it."""
    tok = sp_tok
    stream = tok.encode("the dog and the cat sat", bos=False)
    for stop in (" cat", " c", " the cat", "t"):
        got = generate_scripted([stream], tok, stop_strings=[stop])
        assert got == reference_stops([stream], None, [stop], tok), stop
    assert generate_scripted([stream], tok, stop_strings=[" cat"])[0][1] == "the dog and the"


def test_a_character_cut_by_the_window_never_stops_a_row(sp_tok):
    """A window starting inside "😀" decodes its last byte as U+FFFD: "\ufffdb" is then in the window's text
    but never in the answer's, so a hit in the window alone must not stop the row."""
    tok = sp_tok
    b = tok.sp.piece_to_id("b")
    assert tok.decode([b]) == "b"
    stream = tok.encode("😀", bos=False)[-4:] + [b] * 12
    got = generate_scripted([stream], tok, stop_strings=["\ufffdb"])
    assert got == reference_stops([stream], None, ["\ufffdb"], tok)
    assert got[0][2] == "length"


def test_a_one_character_stop_string_of_four_byte_pieces(sp_tok):
    """"😀" alone is 4 byte pieces: a window of fewer than 4 shown tokens would see only U+FFFD."""
    tok = sp_tok
    stream = tok.encode("the cat 😀 sat", bos=False)
    got = generate_scripted([stream], tok, stop_strings=["😀"])
    assert got == reference_stops([stream], None, ["😀"], tok)
    assert got[0][1:] == ("the cat ", "stop")


# --- One device→host transfer per step --------------------------------------------------------------------

HOST_READS = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__", "numpy", "cpu")


def count_host_reads(monkeypatch, model):
    """Counts calls of every Tensor method that reads values back to the host (on a GPU: a sync), made
    by generate itself: the model's own forward is not counted (generate only calls it). Returns a dict
    whose "n" is the running count."""
    count = {"n": 0, "paused": False}
    for name in HOST_READS:
        def counted(self, *args, _original=getattr(torch.Tensor, name), **kwargs):
            if not count["paused"]:
                count["n"] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    forward = model.hidden_states

    def uncounted(*args, **kwargs):
        count["paused"] = True
        try:
            return forward(*args, **kwargs)
        finally:
            count["paused"] = False

    monkeypatch.setattr(model, "hidden_states", uncounted)
    return count


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_decode_loop_reads_the_host_once_per_step(model, monkeypatch, use_cache):
    """A batch of 3 left-padded rows with a stop string that never appears runs all 12 steps; reading
    each row's token separately (int(nxt[i])) would cost 36 syncs."""
    reference = generate(model, PROMPTS, 12, tokenizer=CharTokenizer(), stop_strings=["zzzzz"],
                         use_cache=use_cache)
    count = count_host_reads(monkeypatch, model)
    int(torch.ones(()))                                                    # the counter counts
    assert count["n"] == 1
    count["n"] = 0
    out = generate(model, PROMPTS, 12, tokenizer=CharTokenizer(), stop_strings=["zzzzz"], use_cache=use_cache)
    monkeypatch.undo()
    assert [c.tokens for c in out] == [c.tokens for c in reference]
    assert all(c.finish_reason == "length" and len(c.tokens) == 12 for c in out)
    assert count["n"] <= 12
