"""model/tokenizer.py: a tiny SentencePiece model is trained on the fly from project-made text.

Oracles: transformers 5 has no slow `LlamaTokenizer` any more (`LlamaTokenizer` is the `tokenizers`-backed,
converted one the OpenLLaMA authors warn about). Its SentencePiece-backed path is the generic
`SentencePieceBackend` (a slow `PreTrainedTokenizer` over `sp_model.encode`, like the old LlamaTokenizer with
legacy=True): ids are compared with it. Its decode does not undo byte-fallback pieces, so decode is checked
against a by-hand join of the pieces instead.
"""

import json
import random
import re
from dataclasses import replace

import pytest
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from micro_model import run_script
from model import PRESETS, Llama, save_pretrained
from model.tokenizer import Tokenizer, check_vocab, train_tokenizer
from toy import world

VOCAB = 420
WORDS = ("a small model reads each token and predicts the next one while attention looks back over "
         "earlier positions the adapter learns a low rank update and the base weights stay frozen in four bits").split()


def project_text(n_lines=300, seed=0):
    """Deterministic made-up lines: prose, numbers, indented code-like lines, a few non-ASCII words."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        line = " ".join(words)
        if i % 4 == 0:
            line = " " * rng.choice((2, 4, 8)) + f"step = {rng.randint(0, 9999)}  # {words[0]}"
        if i % 9 == 0:
            line += f", then {rng.randint(10, 99)}.{rng.randint(0, 9)} percent café naïve"
        lines.append(line)
    return lines


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_tokenizer(project_text(), tmp_path_factory.mktemp("tok") / "tiny", VOCAB)


@pytest.fixture(scope="module")
def tok(model_path):
    return Tokenizer(model_path)


SAMPLES = [
    "the model reads a token",
    "Hello, World!",
    "  two leading spaces and  two inside",
    "trailing spaces   ",
    "line one\nline two\n\n\nafter blank lines\n",
    "    def step(x):\n        return x + 1\n",
    "digits 0123456789 and 3.14159 and 2024-04-18",
    "tabs\tand\tmixed \t whitespace",
    "unicode: café naïve 日本語 😀 Ωμέγα",
    "",
    " ",
    "\n",
]


def test_special_ids_follow_openllama_unk0_bos1_eos2_and_pad_falls_back_to_unk(tok):
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.sp.pad_id() == -1  # no pad piece, as in OpenLLaMA's tokenizer.model …
    assert tok.pad_id == 0        # … so pad falls back to 0, config.json's pad_token_id
    assert tok.vocab_size == len(tok) == VOCAB


def test_encode_prepends_bos_and_appends_eos_only_on_request(tok):
    pieces = tok.sp.encode("the model reads")
    assert tok.encode("the model reads") == [1] + pieces
    assert tok.encode("the model reads", eos=True) == [1] + pieces + [2]
    assert tok.encode("the model reads", bos=False) == pieces
    assert tok.encode("", bos=True, eos=True) == [1, 2]


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_inverts_encode_for_spaces_newlines_digits_and_unicode(tok, text):
    assert tok.decode(tok.encode(text, eos=True)) == text


def test_digits_are_single_pieces_and_newlines_are_bytes(tok):
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode("x 2024\n", bos=False)]
    assert pieces[-5:] == ["2", "0", "2", "4", "<0x0A>"]


def test_runs_of_spaces_are_kept_as_whitespace_only_pieces(tok):
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode("        step", bos=False)]
    assert any(set(p) == {"▁"} and len(p) > 1 for p in pieces)  # e.g. "▁▁▁▁": indentation learnt as pieces
    assert "".join(pieces).count("▁") == 9                      # 8 spaces + the dummy prefix, none merged away


@pytest.mark.parametrize("text", [s for s in SAMPLES if s.strip()])
def test_ids_equal_transformers_sentencepiece_tokenizer(tok, model_path, text):
    oracle = SentencePieceBackend(vocab_file=str(model_path), unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", special_tokens_pattern="bos", legacy=True)
    assert tok.encode(text) == oracle.encode(text)


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_equals_pieces_joined_by_hand(tok, text):
    """Independent decoder: '▁' → ' ', <0xNN> → byte NN, UTF-8 decode, drop the one dummy-prefix space."""
    ids = tok.encode(text, bos=False)
    out = bytearray()
    for i in ids:
        piece = tok.sp.id_to_piece(i)
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            out.append(int(piece[3:5], 16))
        else:
            out += piece.replace("▁", " ").encode("utf-8")
    expected = out.decode("utf-8")
    expected = expected[1:] if expected.startswith(" ") else expected
    assert tok.decode(ids) == expected == text


def test_decode_skips_bos_eos_and_pad_wherever_they_occur(tok):
    body = tok.encode("a small model", bos=False)
    assert tok.decode([1] + body + [2, 0, 0]) == "a small model"
    assert tok.decode([0, 0, 1] + body) == "a small model"  # left padding


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(ValueError, match=f"id {VOCAB} is outside the vocabulary"):
        tok.decode([1, VOCAB])


def test_text_that_spells_special_tokens_is_encoded_as_plain_characters(tok):
    ids = tok.encode("</s> <s>", bos=False)
    assert 1 not in ids and 2 not in ids
    assert tok.decode(ids) == "</s> <s>"


def test_tokenizer_larger_than_model_vocab_is_an_error_naming_both_files(tok):
    with pytest.raises(ValueError, match=r"tiny\.model.*420 pieces.*config\.json.*vocab_size = 400"):
        check_vocab(tok, 400, "ckpt/config.json")


def test_tokenizer_equal_to_model_vocab_is_accepted_silently(tok, tmp_path, capfd):
    check_vocab(tok, VOCAB, tmp_path / "config.json")
    assert capfd.readouterr() == ("", "")


def test_tokenizer_smaller_than_model_vocab_is_an_error_naming_both_files_and_sizes(tok, tmp_path):
    """Issue 16, case 6: a 420-piece tokenizer with a 484-row model is most likely another model's
    tokenizer, and trains without a word unless refused."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"vocab_size": VOCAB + 64}))
    with pytest.raises(ValueError, match=rf"tiny\.model: tokenizer has 420 pieces but .*config\.json says "
                                         rf"vocab_size = 484.*bezoar_padded_vocab") as e:
        check_vocab(tok, VOCAB + 64, config)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="420 pieces"):
        check_vocab(tok, VOCAB + 64, tmp_path)                      # the folder: its config.json is read


def test_padded_embeddings_said_in_config_json_or_by_the_caller_are_one_line_of_notice(tok, tmp_path, capfd):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"vocab_size": VOCAB + 64, "bezoar_padded_vocab": True}))
    check_vocab(tok, VOCAB + 64, config)
    out, err = capfd.readouterr()
    assert out == "" and err.count("\n") == 1
    assert re.fullmatch(r"note: .*tiny\.model has 420 pieces, .*config\.json vocab_size = 484: embedding rows "
                        r"420…483 are padding, never produced\n", err)
    config.write_text(json.dumps({"vocab_size": VOCAB + 64}))
    check_vocab(tok, VOCAB + 64, config, allow_padded_vocab=True)
    assert capfd.readouterr().err.count("\n") == 1
    with pytest.raises(ValueError, match="ids ≥ 400 would overflow"):   # larger stays an error, padded or not
        check_vocab(tok, 400, config, allow_padded_vocab=True)
    config.write_text(json.dumps({"vocab_size": VOCAB + 64, "bezoar_padded_vocab": "yes"}))
    with pytest.raises(ValueError, match="bezoar_padded_vocab is 'yes', expected true or false"):
        check_vocab(tok, VOCAB + 64, config)


def test_train_sft_refuses_a_512_piece_tokenizer_for_a_1024_vocab_model(tmp_path):
    """The issue's case end to end: train_sft.py's load path (check_vocab after load_pretrained) stops
    before any step, naming the tokenizer and the config."""
    base = tmp_path / "base"
    base.mkdir()
    train_tokenizer(world.pretraining_text(600, 0), base / "tokenizer", 512)
    config = replace(PRESETS["tiny"], vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    model = Llama(config)
    model.init_weights(seed=0)
    save_pretrained(model, str(base))
    toml = tmp_path / "run.toml"
    toml.write_text("\n".join([
        f"base = {json.dumps(str(base))}", 'dtype = "float32"', 'device = "cpu"', 'quantize = "none"',
        "batch_size = 2", "micro_batch_size = 1", "max_len = 96", "min_prompt_len = 16", "",
        "[[stages]]", 'name = "lamini"', 'scheme = "lamini"', f"data = [{json.dumps(str(tmp_path / 'lamini.jsonl'))}]",
        "toy_records = 8", "max_steps = 1"]) + "\n")
    code, out = run_script("train_sft.py", "--config", toml, "--out_dir", tmp_path / "run")
    assert code != 0, out[-2000:]
    assert re.search(r"tokenizer\.model: tokenizer has 512 pieces but .*base/config\.json says vocab_size = 1024",
                     out), out[-2000:]
    assert "step=1" not in out and not (tmp_path / "run" / "lamini" / "merged").exists()


def test_missing_or_corrupt_model_file_is_a_one_line_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="nope.model: tokenizer file not found") as e:
        Tokenizer(tmp_path / "nope.model")
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="bad.model: not a SentencePiece model") as e:
        Tokenizer(bad)
    assert "\n" not in str(e.value)


def test_training_is_deterministic_and_reads_a_text_file(tmp_path, model_path):
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n".join(project_text()) + "\n", encoding="utf-8")
    again = train_tokenizer(text_file, tmp_path / "again", VOCAB)
    assert again == tmp_path / "again.model"
    assert again.read_bytes() == model_path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.model", "corpus.txt"]  # no temp left


def test_training_rejects_a_vocabulary_without_room_for_the_byte_pieces(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=200 is too small"):
        train_tokenizer(project_text(), tmp_path / "x", 200)
