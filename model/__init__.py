"""The OpenLLaMA model: architecture, checkpoints, tokenizer, sampling."""
from model.config import PRESETS, LlamaConfig, load_config
from model.llama import KVCache, Llama
from model.loading import iter_checkpoint_tensors, load_pretrained, save_checkpoint, save_pretrained
from model.tokenizer import Tokenizer, check_vocab, train_tokenizer, write_tokenizer_files
