"""Tokenizer: OpenLLaMA's SentencePiece model, ids ↔ text, plus a trainer for small project tokenizers.

OpenLLaMA 3B v2 ships `tokenizer.model`, a SentencePiece BPE model read by the *slow* LlamaTokenizer:

    encode(text) = [bos] + sp.encode(text) (+ [eos] on request)     <unk> = 0, <s> = 1, </s> = 2
    decode(ids)  = sp.decode(ids without bos/eos/pad)

- BOS is prepended by default; the OpenLLaMA authors recommend it (especially for few-shot evaluation).
  EOS is added only when asked, e.g. at the end of a training response; never after an inference prompt.
- There is no pad piece. `pad_id` falls back to 0 (= <unk>), the `pad_token_id` in OpenLLaMA's
  config.json. Padding positions are masked anyway, so the choice only has to be a valid row.
- Control symbols typed as text ("<s>", "</s>") are encoded as ordinary characters, as SentencePiece does;
  only `bos=True` / `eos=True` produce ids 1 / 2. (transformers' tokenizers split such strings into the
  special ids, which lets text in a dataset forge an end of sequence.)
- We never use the auto-converted "fast" tokenizer: the OpenLLaMA authors warn it mis-tokenizes some text.
- v2's model keeps runs of spaces (code indentation): SentencePiece's `remove_extra_whitespaces` is off
  and whitespace-only pieces are allowed, so decode(encode(x)) == x for any text, including unknown
  characters, which fall back to their UTF-8 bytes (<0x00> … <0xFF> pieces).

`train_tokenizer` builds a small model with the same conventions for the CPU demo and the tests.

Files for other tools. Every checkpoint folder bezoar writes holds, beside tokenizer.model, what
transformers, vLLM and TGI read to tokenize exactly as bezoar does (write_tokenizer_files, as OpenLLaMA's
own repository ships them): tokenizer_config.json (LlamaTokenizer, add_bos_token true, add_eos_token false,
the special pieces, `legacy` true — the behaviour OpenLLaMA's config, which predates the key, loads with:
text after a special token gets its "▁" prefix, as sp.encode gives it — and the OpenBezoar `chat_template`
from data/hh.py), special_tokens_map.json and generation_config.json (bos, eos, pad ids). pad is the piece
of pad_id, <unk> (0) for OpenLLaMA, so that padding in those tools uses the row bezoar pads with. One
difference remains, transformers' own: its LlamaTokenizer adds the "▁" dummy prefix only where the text does
not start with a space, so a text beginning with a space gets one "▁" piece fewer than SentencePiece gives it
(tests/test_tokenizer_files.py); no prompt bezoar builds begins with one.
"""

import io
import json
import os
import shutil
import sys
from pathlib import Path

import sentencepiece as spm

from files import atomic_write, write_text_atomic


class Tokenizer:
    """A SentencePiece model with OpenLLaMA's special ids. `Tokenizer("checkpoints/.../tokenizer.model")`."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{self.path}: tokenizer file not found (expected a SentencePiece tokenizer.model)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{self.path}: not a SentencePiece model ({first_line})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()  # 1 in OpenLLaMA
        self.eos_id = self.sp.eos_id()  # 2
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{self.path}: the model defines no BOS/EOS pieces (bos_id={self.bos_id}, "
                             f"eos_id={self.eos_id}); expected Llama's <s>=1 and </s>=2")
        # No pad piece in OpenLLaMA's model (pad_id() == -1): fall back to 0, config.json's pad_token_id.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0

    def encode(self, text, bos=True, eos=False):
        """str → list[int]: [bos] + pieces (+ [eos])."""
        if not isinstance(text, str):
            raise ValueError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        """list[int] → str. BOS, EOS and pad ids are skipped wherever they occur (pad is 0 = <unk> here,
        which a byte-fallback model never emits for real text). An id outside the vocabulary is an error."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"Tokenizer.decode: id {bad[0]} is outside the vocabulary of {self.path} "
                             f"(0 … {self.vocab_size - 1})")
        special = {self.bos_id, self.eos_id, self.pad_id}
        return self.sp.decode([i for i in ids if i not in special])

    def __len__(self):
        return self.vocab_size


def check_vocab(tokenizer, vocab_size, path, allow_padded_vocab=False):
    """Raise unless the tokenizer's ids are exactly the model's embedding rows.

    path: the model's config.json (or its folder), named in the messages. Rules:
      - tokenizer.vocab_size > vocab_size: an error (ids would index past embed_tokens / lm_head);
      - tokenizer.vocab_size < vocab_size: an error too (most likely another model's tokenizer: it trains,
        badly, without a word), unless the checkpoint says its embeddings are padded to a round size —
        `"bezoar_padded_vocab": true` in config.json — or the caller passes allow_padded_vocab=True; then
        one line of notice on stderr, since the extra rows are simply never produced by encode.
    (OpenLLaMA: both are exactly 32000.)"""
    config = os.path.join(path, "config.json") if os.path.isdir(path) else os.fspath(path)
    n = tokenizer.vocab_size
    if n > vocab_size:
        raise ValueError(f"{tokenizer.path}: tokenizer has {n} pieces but {config} says "
                         f"vocab_size = {vocab_size}; ids ≥ {vocab_size} would overflow the embedding")
    if n < vocab_size:
        padded = allow_padded_vocab or _config_says_padded(config)
        if not padded:
            raise ValueError(f"{tokenizer.path}: tokenizer has {n} pieces but {config} says vocab_size = "
                             f"{vocab_size}: not this model's tokenizer? (if the embeddings are padded, set "
                             f'"bezoar_padded_vocab": true in {config})')
        print(f"note: {tokenizer.path} has {n} pieces, {config} vocab_size = {vocab_size}: embedding rows "
              f"{n}…{vocab_size - 1} are padding, never produced", file=sys.stderr)


def _config_says_padded(config):
    """config.json's "bezoar_padded_vocab" (false when the file or the key is absent)."""
    try:
        with open(config, encoding="utf-8") as f:
            value = json.load(f).get("bezoar_padded_vocab", False)
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(value, bool):
        raise ValueError(f"{config}: bezoar_padded_vocab is {value!r}, expected true or false")
    return value


def write_tokenizer_files(folder, tokenizer, model_max_length):
    """Put the tokenizer into a checkpoint folder: tokenizer.model (copied), tokenizer_config.json,
    special_tokens_map.json and generation_config.json (see the module docstring), each written
    atomically. model_max_length: the context length (config.json's max_position_embeddings).
    Returns the file names, in the order written."""
    from data.hh import chat_template                     # here: model/ imports no data code otherwise
    folder = os.fspath(folder)
    piece = tokenizer.sp.id_to_piece
    special = {"bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id),
               "unk_token": piece(tokenizer.sp.unk_id()), "pad_token": piece(tokenizer.pad_id)}
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, **special,
              "model_max_length": int(model_max_length), "legacy": True, "clean_up_tokenization_spaces": False,
              "sp_model_kwargs": {}, "chat_template": chat_template()}
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                  "pad_token_id": tokenizer.pad_id}
    target = os.path.join(folder, "tokenizer.model")
    if not (os.path.exists(target) and os.path.samefile(tokenizer.path, target)):
        atomic_write(target, lambda tmp: shutil.copyfile(tokenizer.path, tmp))
    files = {"tokenizer_config.json": config, "special_tokens_map.json": special,
             "generation_config.json": generation}
    for name, content in files.items():
        write_text_atomic(os.path.join(folder, name), json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return ["tokenizer.model", *files]


def train_tokenizer(texts, out_prefix, vocab_size, character_coverage=1.0, max_sentence_length=1 << 16):
    """Train a SentencePiece BPE model with OpenLLaMA v2's conventions; writes `{out_prefix}.model`.

    texts: a list (or any iterable) of strings, or a str / Path naming a UTF-8 text file. Every text is
    split into lines: SentencePiece learns from lines, so "\\n" is never a piece and is encoded as the
    byte <0x0A>, exactly as in OpenLLaMA. Empty lines are dropped. Deterministic: one thread, every line
    used in order (no sampling, no shuffling). Returns the Path of the .model file (written atomically).
    vocab_size must leave room for the 3 special + 256 byte pieces (byte_fallback)."""
    if vocab_size < 3 + 256 + 1:
        raise ValueError(f"train_tokenizer: vocab_size={vocab_size} is too small; byte_fallback needs "
                         f"3 special + 256 byte pieces, so at least 260")
    if isinstance(texts, (str, os.PathLike)):
        with open(texts, encoding="utf-8") as f:
            texts = f.read().split("\n")
    lines = [line for text in texts for line in text.split("\n") if line]
    too_long = sum(len(line.encode("utf-8")) > max_sentence_length for line in lines)
    if too_long:  # SentencePiece would skip these silently: say so
        print(f"train_tokenizer: skipping {too_long} of {len(lines)} lines longer than {max_sentence_length} bytes")
        lines = [line for line in lines if len(line.encode("utf-8")) <= max_sentence_length]
    if not lines:
        raise ValueError("train_tokenizer: no non-empty lines to learn from")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, character_coverage=character_coverage,
        byte_fallback=True,                  # unknown characters → UTF-8 byte pieces, never <unk>
        split_digits=True,                   # every digit is its own piece
        allow_whitespace_only_pieces=True,   # pieces like "▁▁▁▁" for indentation …
        remove_extra_whitespaces=False,      # … and runs of spaces survive (OpenLLaMA v2's fix over v1)
        normalization_rule_name="identity",  # no NFKC: text comes back byte for byte
        add_dummy_prefix=True,               # "Hello" is encoded as "▁Hello", as in Llama
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
        max_sentence_length=max_sentence_length, hard_vocab_limit=True, minloglevel=2,
    )
    out = Path(f"{out_prefix}.model")
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(model.getvalue()))
    return out
