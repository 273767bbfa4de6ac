"""The device trap: what would break on a GPU, caught on the CPU.

With the CPU speed paths off (BEZOAR_C_KERNELS=0: the CPU then runs exactly the torch code CUDA runs), the
model and data on the CPU and torch's default device set to "meta", any tensor the code makes without naming
its device lands on meta, and the first operation mixing it with a CPU tensor fails (on a GPU the same tensor
would land on the CPU next to CUDA tensors, and fail the same way). Each test runs one piece of the recipe's
GPU path under the trap and checks its result against the same call made outside it.
"""
import contextlib
import os

import pytest
import torch

import training
from data.batching import collate_dpo, collate_sft, tokenize_pair
from data.dpo import collate_dpo_packed
from evals.harness import loglikelihoods
from lora import apply_lora, disable_adapters, merge_into_checkpoint
from losses import dpo_loss, sequence_logps_chunked
from model import Tokenizer, load_pretrained
from model.sampling import generate
from tests.micro_model import micro_model

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def speed_paths_off():
    """BEZOAR_C_KERNELS=0 for the duration: the CPU runs the torch code that CUDA runs."""
    old = os.environ.get("BEZOAR_C_KERNELS")
    os.environ["BEZOAR_C_KERNELS"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["BEZOAR_C_KERNELS"]
        else:
            os.environ["BEZOAR_C_KERNELS"] = old


@contextlib.contextmanager
def trap():
    """The speed paths off and torch's default device "meta", for the duration. Each test compares what it
    computes here with the same call under speed_paths_off() alone."""
    with speed_paths_off():
        torch.set_default_device("meta")
        try:
            yield
        finally:
            torch.set_default_device(None)


def test_the_trap_catches_a_tensor_made_without_a_device():
    x = torch.ones(3, device="cpu")
    with trap(), pytest.raises((RuntimeError, NotImplementedError)):
        (x + torch.ones(3)).tolist()            # torch.ones(3) lands on meta


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    folder, _ = micro_model(tmp_path_factory.mktemp("trap"))
    return str(folder), Tokenizer(os.path.join(folder, "tokenizer.model"))


def qlora(folder, dropout=0.05, seed=0):
    """The trainers' model: NF4 base (quantised while loading), LoRA on q/k/v, checkpointing, train mode."""
    model = load_pretrained(folder, dtype=torch.float32, device="cpu", quantize="nf4")
    torch.manual_seed(seed)
    apply_lora(model, 4, 8, dropout, ("q_proj", "k_proj", "v_proj"))
    with torch.no_grad():                                # B ≠ 0, so every adapter's gradient path is live
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator(device="cpu").manual_seed(1))
    training.set_checkpointing(model, True)
    return model.train()


def sft_rows(tok, n=3):
    rows = []
    for i in range(n):
        prompt = tok.encode(f"{i + 3} plus {i} is", bos=True)
        answer = tok.encode(f" {2 * i + 3}.") + [tok.eos_id]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return rows


def sft_step(model, tok, optimizer=None):
    """One QLoRA SFT step as train_sft.py runs it; returns (loss, the adapters' gradients, their new values,
    the optimizer)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if optimizer is None:
        optimizer = training.make_optimizer(list(params.values()), 1e-2, 0.0, (0.9, 0.999), "cpu")
    b = collate_sft(sft_rows(tok), tok.pad_id)
    hidden = model.hidden_states(b["input_ids"])
    logps = sequence_logps_chunked(hidden, model.lm_head.weight, b["labels"], chunk_size=5)
    n_tokens = (b["labels"][:, 1:] != -100).sum()
    loss = -logps.sum() / n_tokens
    loss.backward()
    grads = {n: p.grad.clone() for n, p in params.items()}
    torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grads, {n: p.detach().clone() for n, p in params.items()}, optimizer


def test_qlora_sft_step(micro):
    folder, tok = micro
    with trap():
        loss, grads, after, _ = sft_step(qlora(folder), tok)
    with speed_paths_off():
        loss_ref, grads_ref, after_ref, _ = sft_step(qlora(folder), tok)
    assert loss.device.type == "cpu" and torch.isfinite(loss)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    for n in grads:
        assert grads[n].abs().sum() > 0, n
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=0, atol=0)
        torch.testing.assert_close(after[n], after_ref[n], rtol=0, atol=0)


def dpo_rows(tok):
    rows = []
    for i in range(3):
        row = tokenize_pair(tok, f"{i + 4} minus {i} is", f" {4}.", f" {i + 7} or so, maybe.", 64, 4)
        rows.append(row)
    return rows


def dpo_step(model, tok, packed, cached):
    from train_dpo import pair_logps
    rows = dpo_rows(tok)
    batch = collate_dpo_packed(rows, tok.pad_id) if packed else collate_dpo(rows, tok.pad_id)
    if cached:
        with torch.no_grad(), disable_adapters(model):
            ref = torch.stack(pair_logps(model, batch, 4), 1).float()        # [B, 2], as the cache holds it
        ref = ref.unbind(1)
    policy = pair_logps(model, batch, 4)
    if not cached:
        with torch.no_grad(), disable_adapters(model):
            ref = pair_logps(model, batch, 4)
    losses, chosen, rejected = dpo_loss(*policy, *ref, 0.1)
    losses.mean().backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "stacked"])
@pytest.mark.parametrize("cached", [False, True], ids=["in-loop-ref", "cached-ref"])
def test_dpo_step(micro, packed, cached):
    folder, tok = micro
    with trap():
        losses, grads = dpo_step(qlora(folder, dropout=0.0), tok, packed, cached)
    with speed_paths_off():
        losses_ref, grads_ref = dpo_step(qlora(folder, dropout=0.0), tok, packed, cached)
    assert losses.device.type == "cpu"
    torch.testing.assert_close(losses, losses_ref, rtol=0, atol=0)
    for n in grads:
        assert grads[n].abs().sum() > 0, n
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=0, atol=0)


@pytest.mark.parametrize("how", ["greedy", "top-p"])
def test_cached_sampling_left_padded_with_stop_strings(micro, how):
    folder, tok = micro
    model = load_pretrained(folder, dtype=torch.float32, device="cpu")
    prompts = [tok.encode("3 plus 4 is", bos=True), tok.encode("7", bos=True)]     # unequal: left padding
    kw = dict(temperature=0.0) if how == "greedy" else dict(temperature=1.0, top_p=0.9)

    def run():
        g = torch.Generator(device="cpu").manual_seed(0)
        return generate(model, prompts, 12, eos_id=tok.eos_id, stop_strings=["is"], tokenizer=tok,
                        generator=g, **kw)

    with trap():
        out = run()
    with speed_paths_off():
        ref = run()
    assert [(c.tokens, c.text, c.finish_reason) for c in out] == [(c.tokens, c.text, c.finish_reason) for c in ref]


def test_harness_batch_with_packed_choices(micro):
    folder, tok = micro
    model = load_pretrained(folder, dtype=torch.float32, device="cpu")
    ctx = tok.encode("5 plus 2 is", bos=True)
    groups = [[(ctx, tok.encode(f" {k}.")) for k in (6, 7, 8)], [(ctx[:3], tok.encode(" two"))]]
    with trap():
        out, cut = loglikelihoods(model, groups, batch_size=2, progress=False)
    with speed_paths_off():
        ref, _ = loglikelihoods(model, groups, batch_size=2, progress=False)
    assert cut == 0 and out == ref


def test_nf4_quantize_while_loading_and_merge_into_checkpoint(micro, tmp_path):
    folder, tok = micro
    with trap():
        model = qlora(folder)
        n = merge_into_checkpoint(model, folder, str(tmp_path / "merged"))
    assert n == 6                                            # 2 layers × q, k, v
    with speed_paths_off():
        merge_into_checkpoint(qlora(folder), folder, str(tmp_path / "merged_ref"))
    a = load_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    b = load_pretrained(str(tmp_path / "merged_ref"), dtype=torch.float32)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k


def test_checkpoint_save_and_resume(micro, tmp_path):
    """save_resume_state after one step, then restore_trainable into a fresh model: the next step equals the
    one a run that never stopped takes."""
    folder, tok = micro
    with trap():
        model = qlora(folder)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        _, _, _, optimizer = sft_step(model, tok)
        training.save_resume_state(str(tmp_path), {"adapter": {n: p.detach() for n, p in params.items()},
                                                 "optimizer": optimizer.state_dict(), "step": 1,
                                                 "rng": training.rng_state()})
        _, _, straight, _ = sft_step(model, tok, optimizer)
        resumed_model = qlora(folder, seed=5)
        resumed = {n: p for n, p in resumed_model.named_parameters() if p.requires_grad}
        opt = training.make_optimizer(list(resumed.values()), 1e-2, 0.0, (0.9, 0.999), "cpu")
        step = training.restore_trainable(training.load_resume_state(str(tmp_path)), resumed, opt, "ckpt")
        _, _, again, _ = sft_step(resumed_model, tok, opt)
    assert step == 1
    for n in straight:
        torch.testing.assert_close(again[n], straight[n], rtol=0, atol=0)


class HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operators that make the host wait for a device: reading a value (item, int, bool: aten's
    _local_scalar_dense) and results whose shape depends on the data (nonzero, masked_select, boolean
    indexing). On the CPU nothing waits, but the same calls on CUDA would block the host each time."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name == "index" and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                                for t in (args[1] if len(args) > 1 else []) if t is not None)
        self.count += name in self.SYNCING or boolean_index
        return func(*args, **(kwargs or {}))


def test_the_chunked_loss_syncs_a_fixed_number_of_times_whatever_the_chunk_count():
    """The frozen-head chunked loss (what every SFT and DPO step runs) looks at values on the host a fixed
    number of times per call (the label check, selecting the response rows), not once per chunk."""
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(3, 20, 16, generator=g, device="cpu", requires_grad=True)
    W = torch.randn(40, 16, generator=g, device="cpu")
    labels = torch.randint(0, 40, (3, 20), generator=g, device="cpu")
    labels[:, :5] = -100
    counts = []
    with speed_paths_off():
        for chunk_size in (2, 7, 64):                        # 26, 8 and 1 chunks of the 51 response tokens
            with HostSyncs() as syncs:
                sequence_logps_chunked(hidden, W, labels, chunk_size).sum().backward()
            counts.append(syncs.count)
    assert counts[0] == counts[1] == counts[2] and counts[0] <= 4, counts
