"""The fast paths of training compute what the plain ones do: packed pre-training blocks read each
text alone (as the perplexity filter does), and SFT batches that ask for the reply's logits only
give the loss and gradients of right-padded batches with every logit."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from kun_dagster import training

VOCAB = 64


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
    )
    model = Qwen2ForCausalLM(cfg).eval()
    model.config.use_cache = False  # as the Trainer runs it (TrainingArguments.use_cache): a KV cache turns the per-text mask off
    return model


def tokenizer(pad: int | None = 0) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1")))
    if pad is not None:
        tok.add_special_tokens({"pad_token": f"t{pad}"})
    return tok


docs_strategy = st.lists(st.lists(st.integers(2, VOCAB - 1), min_size=1, max_size=40), min_size=1, max_size=12)


@given(docs_strategy, st.integers(4, 32))
@settings(max_examples=200, deadline=None)
def test_packing_keeps_every_token_in_order_with_positions_that_restart_per_text(docs, block):
    blocks = training.pack(docs, block)
    flat = [t for d in docs for t in d]
    ids = [t for b in blocks for t in b["input_ids"]]
    if len(flat) >= block:
        assert all(len(b["input_ids"]) == block for b in blocks)  # no padding anywhere
        assert ids == flat[: len(flat) // block * block]  # only the last short block is left out
    else:
        assert ids == flat and len(blocks) == 1  # a corpus shorter than a block is one block
    positions = [p for b in blocks for p in b["position_ids"]]
    assert positions == [p for d in docs for p in range(len(d))][: len(positions)]


def test_a_packed_block_gives_each_text_the_logits_it_has_alone():
    model = tiny_model()
    docs = [[5, 9, 11, 3], [7, 7, 2, 40, 41, 8], [12, 13]]
    (block,) = training.pack(docs, 12)
    batch = training._blocks([block])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        start = 0
        for doc in docs:
            alone = model(input_ids=torch.tensor([doc])).logits[0]
            torch.testing.assert_close(packed[start : start + len(doc)], alone, rtol=1e-4, atol=1e-5)
            start += len(doc)
    assert torch.equal(batch["labels"], batch["input_ids"])


def sft_examples(seed: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(2, VOCAB, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        reply = torch.randint(2, VOCAB, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        out.append({"input_ids": prompt + reply, "labels": [-100] * len(prompt) + reply})
    return out


@pytest.mark.parametrize("seed", range(4))
def test_reply_batches_give_the_loss_and_gradients_of_right_padded_batches(seed):
    batch = sft_examples(seed, 6)
    model = tiny_model(seed).train()
    right = DataCollatorForSeq2Seq(tokenizer(), padding=True, label_pad_token_id=-100)(batch)
    loss = model(**right).loss
    loss.backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    reply = training.ReplyBatches(tokenizer(), model)
    assert reply.tail_only
    left = reply(batch)
    assert left["logits_to_keep"] < left["input_ids"].shape[1] or all(len(b["labels"]) == b["labels"].count(-100) + 1 for b in batch)
    tail_loss = model(**left).loss
    tail_loss.backward()
    torch.testing.assert_close(tail_loss, loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_reply_batches_fall_back_to_every_logit_for_a_model_without_logits_to_keep():
    class OldModel(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, labels=None):
            raise AssertionError("not called")

    reply = training.ReplyBatches(tokenizer(), OldModel())
    assert not reply.tail_only
    got = reply(sft_examples(0, 3))
    assert "logits_to_keep" not in got and got["labels"].shape == got["input_ids"].shape


def test_a_checkpoint_whose_state_a_kill_cut_short_is_not_resumed_from(tmp_path):
    """The Trainer writes trainer_state.json last; a SIGKILL during that write leaves it empty or
    cut, and the checkpoint before it (deleted only after a new one is saved) is the one to resume."""
    for step, state in [(10, '{"global_step": 10}'), (20, ""), (30, '{"global_st')]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-40").mkdir()  # the weights begun, no state yet
    assert training.last_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert training.last_checkpoint(tmp_path / "none") is None
