"""Models of the method: the tiny demo base, and the backward (label) and forward (chat) SFT.

SFT runs on transformers' Trainer with the prompt tokens masked out of the labels, so the loss falls
on the assistant turn only (KUN_METHOD.md); LoRA through peft is an option, merged before saving so
every engine loads a plain checkpoint. (TRL's SFTTrainer does the same masking but patches in a
chunked LM head that trains 7x slower on CPU: docs/ARCHITECTURE.md.) Checkpoints are written to a temporary folder and renamed into
place when complete. A fine-tuning's folder is named by what it trains (base, examples, settings) and
the Trainer saves a resumable checkpoint every `save_steps`, so a run killed mid-training is resumed
from its last checkpoint by the next one, as the LLM stages resume from their batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import dedup, progress
from .config import TinyBaseSettings, TrainSettings
from .model_store import MODEL_CARD, fingerprint
from .prompts import HUMPBACK_SEED_TAG, HUMPBACK_WEB_TAG, chat, label_user

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML as Qwen2 writes it; the tiny base speaks it from the start.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class TrainReport:
    path: str
    examples: int
    mean_loss: float | None  # mean training loss over the steps this call ran (a resumed one: from its checkpoint on)
    seconds: float
    loss_curve: list[tuple[int, float]]  # (step, loss) every logging_steps
    resumed_from_step: int = 0  # the checkpoint a killed fine-tuning was resumed from (0: from the start)


def _publish_dir(tmp: Path, final: Path) -> None:
    """Swap a finished checkpoint folder into place (never a half-written one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _staging(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def _resumable_staging(final: Path, role: str, what: list) -> Path:
    """The folder a fine-tuning works in, named by `what` it trains: a run killed mid-training and
    the next one meet in the same folder and the next resumes (any run id, any output name)."""
    key = hashlib.sha256(json.dumps(what, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
    path = final.parent / f".{re.sub(r'[^A-Za-z0-9_]+', '-', role)}.train-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def last_checkpoint(trainer_dir: Path) -> Path | None:
    """The Trainer's latest complete checkpoint: it writes the trainer state last, so a folder
    without one, or with one a kill cut short mid-write (not JSON), is skipped; the one before it
    is still there (the Trainer deletes old checkpoints only after saving a new one)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    def complete(p: Path) -> bool:
        try:
            json.loads((p / "trainer_state.json").read_text())
        except (OSError, ValueError):
            return False
        return True

    done = [p for p in trainer_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if complete(p)]
    return max(done, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (as Qwen2 uses): no text is ever out of vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _training_args(out: Path, *, epochs: float, lr: float, batch: int, seed: int, settings: TrainSettings | None = None):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out / "_trainer"),
        num_train_epochs=epochs,
        learning_rate=lr,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=settings.gradient_accumulation_steps if settings else 1,
        lr_scheduler_type=settings.lr_scheduler if settings else "cosine",
        weight_decay=settings.weight_decay if settings else 0.0,
        warmup_steps=0 if settings else 10,
        seed=seed,
        data_seed=seed,
        save_strategy="steps" if settings and settings.save_steps else "no",
        save_steps=settings.save_steps if settings and settings.save_steps else 500,
        save_total_limit=1,  # the newest complete checkpoint; the one before is deleted only after it
        # SFT batches of like lengths: less padding to compute through (pre-training blocks have none)
        train_sampling_strategy="group_by_length" if settings else "random",
        report_to=[],
        logging_steps=10,
        disable_tqdm=True,
        use_cpu=not _cuda(),
        bf16=_cuda(),
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _train(model, tokenizer, examples: list[dict], args, collator, peft_config=None, what: str = "training", resume: Path | None = None):
    """Run the Trainer (from the checkpoint `resume` when given); returns (model ready to save, mean
    training loss, loss curve)."""
    from transformers import PrinterCallback, Trainer, TrainerCallback
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress bars would flood the Dagster run logs (kun's own progress reports)

    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)

    class Steps(TrainerCallback):  # training steps as a progress bar (shown by the CLI)
        def on_step_end(self, args, state, control, **kwargs):
            bar.total = state.max_steps
            bar.update(1)

    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collator, callbacks=[Steps()])
    trainer.remove_callback(PrinterCallback)  # losses go to the report and the log, not to stdout
    with progress.task(what, unit="steps") as bar:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    curve = [(int(h["step"]), round(float(h["loss"]), 4)) for h in trainer.state.log_history if "loss" in h]
    log.info("training loss by step: %s", curve)
    model = trainer.model
    if peft_config is not None:
        model = model.merge_and_unload()
    loss = float(result.training_loss) if result.training_loss is not None else None
    return model, loss, curve


def sft_features(tokenizer, user: str, assistant: str, max_length: int, keep_system: bool | str = False) -> dict:
    """input_ids of the rendered conversation, labels -100 over the prompt (loss on the reply only).
    Rendered by prompts.chat, as inference renders it."""
    prompt = chat(tokenizer, user, keep_system=keep_system)
    full = chat(tokenizer, user, assistant, keep_system=keep_system)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without a reply; cannot mask it")
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = (p_ids + tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"])[:max_length]
    return {"input_ids": ids, "labels": [-100] * min(len(p_ids), len(ids)) + ids[len(p_ids) :]}


def pack(docs: list[list[int]], block_size: int) -> list[dict]:
    """Language-model examples of `block_size` tokens: the documents end to end, as GPT-style
    pre-training packs them, with position ids that restart at each document, so that attention
    stays within one (transformers builds that mask from the positions) and a text is learned as
    the perplexity filter reads it, alone. No token is padding. A document longer than what is
    left of a block goes on in the next one, its positions running on; the last, short block is
    dropped unless it is the only one."""
    ids: list[int] = []
    pos: list[int] = []
    for doc in docs:
        ids.extend(doc)
        pos.extend(range(len(doc)))
    n = len(ids) // block_size * block_size or len(ids)
    return [{"input_ids": ids[i : i + block_size], "position_ids": pos[i : i + block_size]} for i in range(0, n, block_size)]


def _blocks(batch: list[dict]) -> dict:
    """Collate packed blocks (all of one length): labels are the inputs."""
    import torch

    ids = torch.tensor([b["input_ids"] for b in batch])
    return {"input_ids": ids, "position_ids": torch.tensor([b["position_ids"] for b in batch]), "labels": ids.clone()}


class ReplyBatches:
    """Collate SFT examples left-padded, so that every reply ends its row, and ask the model for
    logits over the last K positions only (K: what the longest reply needs, from the token before
    its first labelled one): the LM head, most of a small model's compute, runs where the loss is,
    not over the prompt. Position ids count from each row's first real token, so the batch is the
    same computation as a right-padded one (tests/test_training.py compares loss and gradients).
    A model whose forward takes no logits_to_keep gets right-padded batches and every logit."""

    def __init__(self, tokenizer, model):
        import inspect

        from transformers import DataCollatorForSeq2Seq

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad = 0 if pad is None else pad
        forward = getattr(model, "get_base_model", lambda: model)().forward
        self.tail_only = "logits_to_keep" in inspect.signature(forward).parameters
        self.fallback = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        if not self.tail_only:
            return self.fallback([{"input_ids": b["input_ids"], "labels": b["labels"]} for b in batch])
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        positions = torch.zeros((len(batch), width), dtype=torch.long)
        keep = 1
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, width - n :] = torch.tensor(b["input_ids"])
            labels[row, width - n :] = torch.tensor(b["labels"])
            mask[row, width - n :] = 1
            positions[row, width - n :] = torch.arange(n)
            first = next((i for i, t in enumerate(b["labels"]) if t != -100), n)
            keep = max(keep, n - first + 1)
        # logits at the last `keep` positions predict the labels one to their right: the loss
        # shifts the labels it is given, so it is given the same last `keep` of them
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels[:, -keep:], "logits_to_keep": keep}


def build_tiny_base(texts: list[str], out_dir: str | Path, settings: TinyBaseSettings) -> TrainReport:
    """The embedded default's base: a tokenizer trained on `texts`, a small Qwen2 config, and a
    short language-model pre-training on the same texts so that perplexity means something."""
    import time

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t0 = time.time()
    final = Path(out_dir)
    tmp = _staging(final)
    torch.manual_seed(settings.seed)
    tokenizer = train_tokenizer(texts, settings.vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        max_position_embeddings=settings.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    loss, curve = None, []
    if settings.pretrain_epochs > 0:
        eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        examples = pack([tokenizer(t)["input_ids"][: settings.max_position_embeddings - 1] + [eos] for t in texts], settings.block_size)
        args = _training_args(
            tmp, epochs=settings.pretrain_epochs, lr=settings.learning_rate, batch=settings.batch_size, seed=settings.seed
        )
        model, loss, curve = _train(model, tokenizer, examples, args, _blocks, what="base_model pre-training")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(tmp / "_trainer", ignore_errors=True)
    report = TrainReport(path=str(final), examples=len(texts), mean_loss=loss, seconds=round(time.time() - t0, 1), loss_curve=curve)
    (tmp / MODEL_CARD).write_text(json.dumps({"kind": "tiny_base", **report.__dict__}, ensure_ascii=False, indent=1))
    _publish_dir(tmp, final)
    return report


# -- seed pairs ----------------------------------------------------------------------------------------
TRAIN, EVAL = "train", "eval"  # the seeds' split (column `split`)


def load_seeds(
    uri: str, storage_options: dict | None, drop_multiple_choice: bool, eval_fraction: float = 0.0, min_output_chars: int = 0
) -> tuple[pd.DataFrame, int]:
    """COIG-CQIA seed records (instruction, input, output, ...) from JSONL, with `input` filled in
    ("" when absent); multiple-choice items dropped (Kun); `split` eval for the held-out share
    (seed_split: answers of at least `min_output_chars`, whole near-duplicate clusters), train for
    the rest. Returns (seeds, items dropped)."""
    seeds = pd.read_json(uri, lines=True, dtype=False, storage_options=storage_options or None)  # None for a local file
    missing = {"instruction", "output"} - set(seeds.columns)
    if missing:
        raise ValueError(f"seed file {uri} lacks fields {sorted(missing)}")
    seeds["input"] = seeds.get("input", pd.Series([""] * len(seeds))).fillna("").astype(str)
    mc = seeds["input"].map(is_multiple_choice) if drop_multiple_choice else pd.Series(False, index=seeds.index)
    kept = seeds[~mc].reset_index(drop=True)
    kept["split"] = seed_split(kept, eval_fraction, min_output_chars)
    return kept, int(mc.sum())


SEED_NEAR = 0.8  # estimated Jaccard at which two seeds are one item (the corpus dedup's default)


def seed_split(seeds: pd.DataFrame, eval_fraction: float, min_output_chars: int = 0) -> pd.Series:
    """eval for the held-out seeds, train for the rest, so that the evaluation measures what no
    model trained on: near-duplicate seeds (template-built ones, the same item twice) are one
    cluster and fall on one side together, and only answers are held out (an output of at least
    `min_output_chars`: a 【好】 verdict or an option letter measures nothing). A cluster is held out
    when the hash of its first record (instruction, input, output; the lowest hash) falls under
    eval_fraction, so the split is the same whatever the file's order or the seeds added beside it.
    At least one is held out when the fraction is not 0 and an answer exists."""
    u = np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{i}\0{inp}\0{o}".encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big") / 2**64
            for i, inp, o in zip(seeds["instruction"], seeds["input"], seeds["output"])
        ],
        dtype=float,
    )
    records = [f"{i}\n{inp}\n{o}" for i, inp, o in zip(seeds["instruction"], seeds["input"], seeds["output"])]
    keeper = dedup.keepers(records, SEED_NEAR, rank=np.argsort(np.argsort(u, kind="stable"), kind="stable"))
    answer = seeds["output"].astype(str).str.len().to_numpy() >= min_output_chars
    eligible = answer[keeper] if len(seeds) else np.zeros(0, dtype=bool)
    held = eligible & (u[keeper] < eval_fraction) if len(seeds) else np.zeros(0, dtype=bool)
    if eval_fraction > 0 and not held.any() and len(seeds) > 1 and eligible.any():
        first = keeper[np.flatnonzero(eligible)[np.argmin(u[eligible])]]
        held = keeper == first
    return pd.Series(np.where(held, EVAL, TRAIN), index=seeds.index, dtype=object)


def training_seeds(seeds: pd.DataFrame) -> pd.DataFrame:
    """The seeds every model trains on: the held-out ones left out (seed_data without a split: all)."""
    return seeds[seeds["split"] != EVAL] if "split" in seeds else seeds


def heldout_seeds(seeds: pd.DataFrame) -> pd.DataFrame:
    return seeds[seeds["split"] == EVAL].reset_index(drop=True) if "split" in seeds else seeds.iloc[:0]


def is_multiple_choice(record_input: str) -> bool:
    """Kun drops seed items whose input holds all of A, B, C, D."""
    return all(ch in (record_input or "") for ch in "ABCD")


def prompt_of(instruction: str, inp: str) -> str:
    return f"{instruction}\n{inp}" if inp else instruction


def label_examples(seeds: pd.DataFrame, min_output_chars: int = 0) -> list[tuple[str, str]]:
    """Backward pairs: the seed output as the user turn (in the label prompt that inference uses),
    instruction + input as the assistant turn. Seeds whose output is shorter than min_output_chars
    (a bare verdict such as 【好】) are left out: the backward model labels documents."""
    seeds = training_seeds(seeds)
    return [
        (label_user(o), prompt_of(i, inp))
        for i, inp, o in zip(seeds["instruction"], seeds["input"], seeds["output"])
        if len(o.strip()) >= min_output_chars
    ]


def chat_examples(seeds: pd.DataFrame, records: pd.DataFrame | None = None) -> list[tuple[str, str]]:
    """Forward pairs: instruction + input -> output, of the training seeds and then of `records`
    (a release's, in the later rounds and the evaluation)."""
    seeds = training_seeds(seeds)
    pairs = [(prompt_of(i, inp), o) for i, inp, o in zip(seeds["instruction"], seeds["input"], seeds["output"])]
    if records is not None:
        pairs += [(prompt_of(i, inp), o) for i, inp, o in zip(records["instruction"], records["input"], records["output"])]
    return pairs


def humpback_examples(seeds: pd.DataFrame, segments: pd.DataFrame) -> list[tuple[str, str, str]]:
    """Humpback's training set for M_k: the training seeds under the assistant tag, and the pairs
    the previous round kept by score, (instruction, the raw text as the answer), under the
    web-search tag: (user, answer, system message)."""
    tagged = [(u, a, HUMPBACK_SEED_TAG) for u, a in chat_examples(seeds)]
    return tagged + [(i, t, HUMPBACK_WEB_TAG) for i, t in zip(segments["instruction"], segments["text"])]


def fine_tune(
    base_dir: str | Path,
    out_dir: str | Path,
    examples: list[tuple[str, ...]],
    settings: TrainSettings,
    role: str,
    keep_system: bool = False,
) -> TrainReport:
    """SFT with the loss on the assistant turn only, in the prompt format inference uses (a base
    without a chat template: Kun's literal ChatML)."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # before loading: transformers' "Loading weights" bar would reach the logs
    if not examples:
        raise ValueError(f"{role}: no training examples")
    t0 = time.time()
    final = Path(out_dir)
    tmp = _resumable_staging(final, role, [fingerprint(base_dir), examples, settings.shaping(), keep_system])
    resume = last_checkpoint(tmp / "_trainer")
    if resume:
        log.info("%s: resuming the fine-tuning from %s", role, resume.name)
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16 if _cuda() else torch.float32)
    # an example's third item is its own system message (humpback_examples)
    data = [sft_features(tokenizer, ex[0], ex[1], settings.max_length, ex[2] if len(ex) > 2 else keep_system) for ex in examples]
    peft_config = None
    if settings.lora:
        from peft import LoraConfig

        lo = settings.lora
        peft_config = LoraConfig(
            r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lo.target_modules, task_type="CAUSAL_LM"
        )
    args = _training_args(
        tmp, epochs=settings.epochs, lr=settings.learning_rate, batch=settings.batch_size, seed=settings.seed, settings=settings
    )
    model, loss, curve = _train(
        model, tokenizer, data, args, ReplyBatches(tokenizer, model), peft_config, what=f"{role}_model fine-tuning", resume=resume
    )
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(tmp / "_trainer", ignore_errors=True)
    report = TrainReport(
        path=str(final),
        examples=len(examples),
        mean_loss=loss,
        seconds=round(time.time() - t0, 1),
        loss_curve=curve,
        resumed_from_step=int(resume.name.rsplit("-", 1)[1]) if resume else 0,
    )
    card = {"kind": f"{role}_sft", "base": str(base_dir), "settings": settings.model_dump(), **report.__dict__}
    (tmp / MODEL_CARD).write_text(json.dumps(card, ensure_ascii=False, indent=1))
    _publish_dir(tmp, final)
    for abandoned in final.parent.glob(f"{tmp.name.rsplit('-', 1)[0]}-*"):  # this role's work on inputs since changed
        shutil.rmtree(abandoned, ignore_errors=True)
    return report
