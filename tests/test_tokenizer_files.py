"""The tokenizer files of a checkpoint folder (model/tokenizer.py write_tokenizer_files): other tools load
what bezoar writes and tokenize, template and generate exactly as bezoar does.

Oracle: transformers, reading only the folder, as a user or vLLM would. transformers 5 always builds the
`tokenizers`-backed LlamaTokenizer (converted from tokenizer.model; `use_fast=False` is ignored), so both
spellings of AutoTokenizer.from_pretrained are checked. Expected strings come from data/template.py's
format_prompt and data/hh.py's dialogue_prompt, the functions the SFT stages train with.
"""
import json
import os
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from data.hh import dialogue_prompt
from data.template import format_prompt
from lora import apply_lora, lora_modules, merge_into_checkpoint
from model import PRESETS, Llama, Tokenizer, load_pretrained, save_pretrained, train_tokenizer
from model.sampling import generate
from toy import world

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER_FILES = ["generation_config.json", "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]

# Spaces (leading, trailing, runs), newlines, tabs, digits, unicode (in and out of the tokenizer's training
# text: byte fallback), emoji, code, and the prompt template itself.
TEXTS = [
    "the model reads a token",
    "Hello, World!",
    " one leading space",
    "   three leading spaces and  two inside",
    "trailing spaces   ",
    "line one\nline two\n\n\nafter blank lines\n",
    "\nstarts with a newline",
    "    def step(x):\n        return x + 1\n",
    "for i in range(10):\n\tprint(f\"{i:03d}\")  # tab-indented",
    "digits 0123456789 and 3.14159 and 2024-04-18",
    "unicode: café naïve 日本語 Ωμέγα",
    "emoji 😀👍🏽 and a ZWJ family 👨‍👩‍👧",
    "",
    " ",
    "\n",
    format_prompt("What is 7 plus 5?"),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """base/: a random 2-layer LLaMA saved with save_pretrained(tokenizer=…), its tokenizer trained on toy
    text plus a few unicode lines; merged/: base with random LoRA adapters merged by merge_into_checkpoint
    (the call a stage's end makes), which takes base's tokenizer along."""
    root = tmp_path_factory.mktemp("ckpt")
    texts = world.pretraining_text(300, 0) + ["café naïve Ωμέγα", "    def step(x):", "        return x + 1"]
    tok = Tokenizer(train_tokenizer(texts, root / "tok", vocab_size=400))
    config = replace(PRESETS["tiny"], vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    model = Llama(config)
    model.init_weights(seed=0)
    save_pretrained(model, str(root / "base"), tokenizer=tok)
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=generator) * 0.5)
    merge_into_checkpoint(model, str(root / "base"), str(root / "merged"))
    return tok, root / "base", root / "merged"


def test_save_pretrained_and_merge_into_checkpoint_write_the_tokenizer_files_openllama_ships(folders):
    tok, base, merged = folders
    for folder in (base, merged):
        assert sorted(set(os.listdir(folder)) - {"config.json", "model.safetensors"}) == TOKENIZER_FILES
        assert (folder / "tokenizer.model").read_bytes() == tok.path.read_bytes()
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert (config["tokenizer_class"], config["add_bos_token"], config["add_eos_token"]) == ("LlamaTokenizer", True, False)
        assert (config["bos_token"], config["eos_token"], config["unk_token"], config["pad_token"]) == ("<s>", "</s>", "<unk>", "<unk>")
        assert config["model_max_length"] == 256 and config["legacy"] is True and "### Response:" in config["chat_template"]
        assert json.loads((folder / "special_tokens_map.json").read_text()) == {
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
        assert json.loads((folder / "generation_config.json").read_text()) == {
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
        generation = GenerationConfig.from_pretrained(folder)              # transformers reads the same ids
        assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)


@pytest.mark.parametrize("kwargs", [{"use_fast": False}, {}], ids=["use_fast=False", "default"])
def test_autotokenizer_from_the_folder_gives_our_ids_bos_first_on_varied_text(folders, kwargs):
    tok, _, merged = folders
    theirs = AutoTokenizer.from_pretrained(str(merged), **kwargs)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    space = tok.sp.piece_to_id("▁")
    for text in TEXTS:
        ours = tok.encode(text)
        if text.startswith(" "):
            # transformers 5's LlamaTokenizer (a Metaspace pre-tokenizer, prepend_scheme "always") adds the dummy
            # prefix "▁" only where the text does not already start with one; SentencePiece always adds it. So a
            # text that begins with a space has one "▁" piece fewer there; with OpenLLaMA's own tokenizer too. No
            # prompt bezoar builds starts with a space (the template starts with text, chat turns after a marker).
            assert ours[1] == space and theirs(text)["input_ids"] == ours[:1] + ours[2:], repr(text)
            continue
        assert theirs(text)["input_ids"] == ours, repr(text)
        assert theirs.encode(text, add_special_tokens=False) == tok.encode(text, bos=False), repr(text)
        assert theirs.decode(ours, skip_special_tokens=True) == tok.decode(ours), repr(text)


SYSTEM = "You are an AI assistant. Think step by step and justify your steps."
CONVERSATIONS = {  # name: (messages, the prompt bezoar trains and generates with)
    "single turn": ([{"role": "user", "content": "Name three primary colours."}],
                    format_prompt("Name three primary colours.")),
    "system message": ([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Why is the sky blue?"}],
                       format_prompt("Why is the sky blue?", system=SYSTEM)),
    "empty system message": ([{"role": "system", "content": ""}, {"role": "user", "content": "Hi."}],
                             format_prompt("Hi.", system="")),
    "multi-turn, as the HH stage": (
        [{"role": "user", "content": "What is a bezoar?"}, {"role": "assistant", "content": "A mass in the stomach."},
         {"role": "user", "content": "Is it dangerous?"}],
        dialogue_prompt([("Human", "What is a bezoar?"), ("Assistant", "A mass in the stomach."),
                         ("Human", "Is it dangerous?")])),
    "multi-line turns": (
        [{"role": "user", "content": "Fix this:\n    x = 1 +"}, {"role": "assistant", "content": "Add a term:\n    x = 1 + 2"},
         {"role": "user", "content": "And in C?"}, {"role": "assistant", "content": "int x = 1 + 2;"},
         {"role": "user", "content": "Thanks 😀"}],
        dialogue_prompt([("Human", "Fix this:\n    x = 1 +"), ("Assistant", "Add a term:\n    x = 1 + 2"),
                         ("Human", "And in C?"), ("Assistant", "int x = 1 + 2;"), ("Human", "Thanks 😀")])),
}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_apply_chat_template_renders_format_prompt_after_bos_and_tokenizes_as_we_do(folders, name):
    """The rendered text is "<s>" + the prompt (the template puts BOS in, since apply_chat_template and vLLM
    tokenize it without adding special tokens); its ids are exactly Tokenizer.encode(prompt)."""
    tok, _, merged = folders
    messages, prompt = CONVERSATIONS[name]
    theirs = AutoTokenizer.from_pretrained(str(merged))
    assert theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == "<s>" + prompt
    ids = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids == tok.encode(prompt)
    without = theirs.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert without == "<s>" + prompt.removesuffix("### Response:\n")     # the generation prompt is that line


def test_a_conversation_ending_in_an_assistant_turn_renders_the_sft_training_text(folders):
    tok, _, merged = folders
    theirs = AutoTokenizer.from_pretrained(str(merged))
    messages = CONVERSATIONS["multi-turn, as the HH stage"][0] + [{"role": "assistant", "content": "Sometimes."}]
    prompt = CONVERSATIONS["multi-turn, as the HH stage"][1]
    assert theirs.apply_chat_template(messages, tokenize=False) == "<s>" + prompt + "Sometimes.</s>"
    # Tokenized as one text (as transformers does; bezoar's SFT encodes prompt and response apart, so the ids
    # at their seam may differ): exactly our tokenizer on that text.
    ids = theirs.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids == tok.encode(prompt + "Sometimes.", eos=True)


@pytest.mark.parametrize("messages", [
    [],
    [{"role": "system", "content": SYSTEM}],
    [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi."}],
    [{"role": "user", "content": "Hi."}, {"role": "user", "content": "Hello?"}],
    [{"role": "user", "content": "   "}],
], ids=["empty", "system only", "assistant first", "two user turns", "blank turn"])
def test_conversations_the_template_cannot_express_are_refused(folders, messages):
    theirs = AutoTokenizer.from_pretrained(str(folders[2]))
    # An empty list transformers refuses itself, before the template runs.
    with pytest.raises(Exception, match="OpenBezoar chat: |empty conversation"):
        theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_automodel_greedy_generate_from_the_merged_folder_gives_our_greedy_tokens(folders):
    tok, _, merged = folders
    theirs_tok = AutoTokenizer.from_pretrained(str(merged))
    theirs = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    ours = load_pretrained(str(merged)).eval()
    for messages, prompt in list(CONVERSATIONS.values())[:3]:
        ids = theirs_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True, return_tensors="pt")["input_ids"]
        assert ids[0].tolist() == tok.encode(prompt)
        with torch.no_grad():
            out = theirs.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
        expected = generate(ours, [tok.encode(prompt)], 16, temperature=0.0, eos_id=tok.eos_id)[0]
        assert out == expected.tokens + ([tok.eos_id] if expected.finish_reason == "eos" else [])
