"""The micro model the end-to-end tests share: a random 2-layer LLaMA (hidden 64) with a SentencePiece
tokenizer trained on toy text, saved as a Hugging Face folder; and the training scripts run on it in a
subprocess, with a SIGTERM on a chosen log line."""
import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace

from model import PRESETS, Llama, Tokenizer, save_pretrained, train_tokenizer
from toy import world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One thread per process: the micro model gains nothing from more, and two spinning OpenMP threads on a
# busy machine slow every step several-fold (torchrun sets the same for its ranks).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def micro_model(folder, texts=None, vocab_size=384, max_position_embeddings=256, seed=0):
    """Write tokenizer.model (trained on `texts`, default 300 toy pretraining lines) and a random Llama
    (hidden 64, 2 layers, 2 heads) with its vocabulary to `folder`; returns (folder, model)."""
    texts = world.pretraining_text(300, 0) if texts is None else texts
    train_tokenizer(texts, folder / "tokenizer", vocab_size=vocab_size)
    tok = Tokenizer(folder / "tokenizer.model")
    config = replace(PRESETS["tiny"], vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                     max_position_embeddings=max_position_embeddings)
    model = Llama(config)
    model.init_weights(seed=seed)
    save_pretrained(model, str(folder))
    return folder, model


def run_apart(script, *args, kill_at=None, sig=signal.SIGTERM, timeout=120):
    """As run_script, with stderr kept apart: returns (return code, stdout, stderr lines). kill_at: a stdout
    line prefix; on seeing it, send `sig` (SIGKILL: a process killed outright, as by the OOM killer)."""
    proc = subprocess.Popen([sys.executable, "-u", script, *map(str, args)], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = []
    drain = threading.Thread(target=lambda: err.extend(proc.stderr))   # a full stderr pipe would block it
    drain.start()
    out = []
    for line in proc.stdout:
        out.append(line)
        if kill_at and line.startswith(kill_at + " "):
            proc.send_signal(sig)
            kill_at = None
    code = proc.wait(timeout=timeout)
    drain.join()
    return code, "".join(out), [line.rstrip("\n") for line in err]


def run_script(script, *args, kill_at=None):
    """Run `script` (train_sft.py, train_dpo.py) from the repository root in a subprocess. kill_at: a
    log-line prefix such as "stage=lamini step=4"; on seeing it, send SIGTERM. Returns (return code, output)."""
    proc = subprocess.Popen([sys.executable, "-u", script, *map(str, args)], cwd=REPO, env=ENV,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = []
    for line in proc.stdout:
        out.append(line)
        if kill_at and line.startswith(kill_at + " "):
            proc.send_signal(signal.SIGTERM)
            kill_at = None
    return proc.wait(timeout=120), "".join(out)
