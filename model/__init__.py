"""The OpenLLaMA model: architecture, checkpoints, tokenizer, sampling."""
from model.config import PRESETS, LlamaConfig, load_config
from model.llama import KVCache, Llama
from model.tokenizer import Tokenizer, check_vocab, train_tokenizer
