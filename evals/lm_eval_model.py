"""bezoar checkpoints inside lm-evaluation-harness: an lm_eval model class registered as `bezoar`.

lm-eval finds a model class by name in its registry, and has no plugin hook (entry point) for outside
packages, so this module must be imported before lm-eval looks the name up. Two ways:

    python -m evals.lm_eval_model --model bezoar --model_args pretrained=checkpoints/open_llama_3b_v2 \\
        --tasks arc_easy,hellaswag --batch_size 16 --output_path out/       # = the lm_eval command line
    python -m evals.lm_eval_model run --model bezoar ... --include_path my_tasks/   # any lm_eval subcommand

or from Python:

    import lm_eval, evals.lm_eval_model        # the import registers "bezoar"
    lm_eval.simple_evaluate(model="bezoar", model_args="pretrained=PATH,dtype=bfloat16", tasks=["arc_easy"])

model_args: pretrained (checkpoint folder), tokenizer (default PATH/tokenizer.model), dtype (float32,
bfloat16, float16; default or auto: the checkpoint's), quantize (nf4), adapter (a PEFT adapter folder),
max_length (default max_position_embeddings), max_gen_toks (256). lm_eval's --device (cpu, cuda, …) and
--batch_size (requests per forward pass; "auto" means 16) apply as usual.

The scoring is evals/harness.py's: requests sharing a context are grouped and their context runs once
(one packed row per group), lm_head runs only on continuation positions. lm-eval supplies the token ids
(TemplateLM._encode_pair calls our tok_encode, BOS prepended) and aggregates the metrics itself.
lm-eval is a test-only dependency of bezoar (requirements-test.txt); this module needs it installed.
"""
import sys

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from evals.harness import loglikelihoods
from model.loading import load_pretrained
from model.sampling import generate
from model.tokenizer import Tokenizer


@register_model("bezoar")
class BezoarLM(TemplateLM):
    def __init__(self, pretrained, tokenizer=None, dtype=None, device=None, batch_size=16, max_length=None,
                 max_gen_toks=256, quantize=None, adapter=None, add_bos_token=True, **unused):
        super().__init__()
        if unused:
            print(f"bezoar: ignoring model_args {sorted(unused)}", file=sys.stderr)
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            print(f"bezoar: device {device} is not available (lm_eval's default is cuda:0); using cpu", file=sys.stderr)
            device = "cpu"
        self._device = torch.device(device or "cpu")
        if isinstance(dtype, str):                  # "auto" (lm-eval's spelling) = the checkpoint's own dtype
            dtype = None if dtype == "auto" else getattr(torch, dtype)
        self.model = load_pretrained(pretrained, dtype=dtype, device=self._device, quantize=quantize)
        if adapter:
            from lora.adapters import load_adapter
            load_adapter(self.model, adapter)
        self.model.eval()
        self.tok = Tokenizer(tokenizer or f"{pretrained}/tokenizer.model")
        self.batch_size = 16 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        self.max_length = int(max_length or self.model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = str(add_bos_token).lower() not in ("false", "0", "no")

    @property
    def eot_token_id(self):
        return self.tok.eos_id

    @property
    def prefix_token_id(self):
        return self.tok.bos_id

    def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        ids = self.tok.encode(string, bos=self.add_bos_token if add_special_tokens is None else add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, **kwargs):
        return self.tok.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """requests: [((context, continuation), context ids, continuation ids)]. Requests with the same
        context ids form one group, whose context runs once."""
        groups, where = {}, []
        for _, context, continuation in requests:
            key = tuple(context)
            group = groups.setdefault(key, [])
            where.append((key, len(group)))
            group.append((list(context), list(continuation)))
        keys = list(groups)
        scores, _ = loglikelihoods(self.model, [groups[k] for k in keys], self.batch_size, not disable_tqdm,
                                   max_length=self.max_length)
        by_key = dict(zip(keys, scores))
        out = [tuple(by_key[k][i]) for k, i in where]
        for (strings, _, _), answer in zip(requests, out):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Perplexity tasks: the text in disjoint windows of max_length tokens, each scored after one
        token of context (the harness's get_rolling_token_windows, context_len=1)."""
        out = []
        for (string,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows], disable_tqdm=True)
            out.append(sum(ll for ll, _ in scores))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), out[-1])
        return out

    def generate_until(self, requests, disable_tqdm=False):
        """Requests with the same generation settings are batched, longest prompt first."""
        settings, prompts = {}, []
        for i, (context, kwargs) in enumerate(r.args for r in requests):
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            max_gen_toks = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            key = (until, max_gen_toks, temperature, float(kwargs.get("top_p") or 1.0))
            settings.setdefault(key, []).append(i)
            prompts.append(self.tok_encode(context, left_truncate_len=self.max_length - max_gen_toks))
        out = [None] * len(prompts)
        with tqdm(total=len(prompts), desc="generate_until", unit="req", disable=disable_tqdm) as bar:
            for (until, max_gen_toks, temperature, top_p), members in settings.items():
                members = sorted(members, key=lambda i: (-len(prompts[i]), i))
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start:start + self.batch_size]
                    done = generate(self.model, [prompts[i] for i in chunk], max_gen_toks, temperature=temperature,
                                    top_p=top_p, eos_id=self.tok.eos_id, stop_strings=until, tokenizer=self.tok)
                    for i, completion in zip(chunk, done):
                        out[i] = completion.text
                        self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                    bar.update(len(chunk))
        return out


def main(argv=None):
    """lm_eval's own command line, with "bezoar" registered."""
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm_eval"] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
