"""Does the made data help? Kun judges its data by fine-tuning on it; so does the evaluation asset.

The configured base is fine-tuned with one set of training settings (models.chat.train) on the
training seeds alone (the baseline) and on the training seeds + a release (each source's, and all
together). Each model is then measured on the held-out seeds (seed.eval_fraction, in no training
set):

- loss: the mean negative log-likelihood of the held-out answers' tokens given their instructions
  (the SFT loss, prompt masked), and its perplexity;
- a pairwise judgement by the chat model: for each held-out instruction, the candidate's answer and
  the baseline's, in both orders; the judge's probability that the first is better is read from
  the answers 1 / 2 (one decode step), by the scorer's rule: where the judge puts under
  score.min_answer_mass on them, its free-text verdict is parsed instead, and a reply naming
  neither is a tie (0.5). A position bias (the judge preferring whichever comes first) cancels in
  the mean of the two orders: win = (P(first | B, A) + 1 - P(first | A, B)) / 2. The win rate is
  the mean over items, with a bootstrap 95% interval over items.

Trained models are cached by their content (base fingerprint, examples, settings): a second round
or a rerun re-trains only what changed (the baseline is trained once for every round).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import prompts, training
from .config import KunConfig, LoraSettings, TrainSettings
from .llm.base import Engine, EngineSpec, SamplingParams

log = logging.getLogger(__name__)

BASELINE = "seeds"
PROBABILITY, FREETEXT, TIE = "probability", "freetext", "tie"  # how a verdict was read
JUDGE_CHOICES = ("1", "2")
JUDGE_PREFIX = "更好的回答是："
LORA_ABOVE = 3e9  # parameters: evaluation.lora auto trains LoRA adapters on larger bases


def judge_user(instruction: str, first: str, second: str) -> str:
    return (
        "请比较下面两个回答，判断哪一个更好地完成了指令：准确、有用、完整、通顺。只回答 1 或 2。\n\n"
        f"指令：{instruction}\n\n回答1：{first}\n\n回答2：{second}"
    )


# -- the pairwise judgement -------------------------------------------------------------------------
def parse_verdict(reply: str) -> float:
    """A free-text verdict: 1.0 when it names answer 1 first, 0.0 for answer 2, 0.5 (a tie) for neither."""
    found = re.search(r"[12]", reply or "")
    return 0.5 if not found else 1.0 if found.group() == "1" else 0.0


def first_better(judge: Engine, items: list[tuple[str, str, str]], cfg: KunConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """P(the first answer is better) per (instruction, first, second), and how it was read, by the
    scorer's rule: where the judge puts at least score.min_answer_mass on the answers 1 / 2, their
    probabilities (normalised over the two); elsewhere its free-text verdict, parsed (`freetext`),
    or a tie when it names neither (`tie`). Also the mass on the two answers."""
    if not items:
        return np.zeros(0), np.zeros(0), []
    keep_system = prompts.system_of(judge, cfg)  # a Humpback-tagged round model is prompted as it was trained
    rendered, answers = prompts.choice_prompts(judge.tokenizer, [judge_user(*it) for it in items], JUDGE_CHOICES, JUDGE_PREFIX, keep_system)
    p = np.exp(np.asarray(judge.choice_logprobs(rendered, answers), dtype=float))
    mass = p.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        first = np.where(mass > 0, p[:, 0] / np.where(mass > 0, mass, 1), 0.5)
    rules = [PROBABILITY if m >= cfg.score.min_answer_mass else FREETEXT for m in mass]
    low = [i for i, r in enumerate(rules) if r == FREETEXT]
    if low:
        params = SamplingParams(temperature=0.0, max_tokens=16, repetition_penalty=cfg.sampling.repetition_penalty)
        for i, g in zip(low, judge.generate([rendered[i] for i in low], params)):
            first[i] = parse_verdict(g.text)
            rules[i] = FREETEXT if first[i] != 0.5 else TIE
    return first, mass, rules


@dataclass
class Comparison:
    wins: np.ndarray  # per item: the candidate's win probability, both orders averaged
    position_bias: float  # mean P(first) + P(first, swapped) - 1: 0 none, > 0 the first position preferred
    judge_mass: float  # median mass on the answers 1 / 2
    judged_by: dict  # rule -> verdicts read by it (probability, freetext, tie)
    win_rate: float = 0.0
    ci: tuple[float, float] = (0.0, 0.0)


def compare(judge: Engine, instructions: list[str], candidate: list[str], baseline: list[str], cfg: KunConfig) -> Comparison:
    """The candidate's answers against the baseline's, each pair judged in both orders."""
    n = len(instructions)
    ab, mass_ab, rules_ab = first_better(judge, list(zip(instructions, baseline, candidate)), cfg)  # baseline first
    ba, mass_ba, rules_ba = first_better(judge, list(zip(instructions, candidate, baseline)), cfg)  # candidate first
    wins = (ba + (1 - ab)) / 2
    out = Comparison(
        wins=wins,
        position_bias=float(np.mean(ab + ba - 1)) if n else 0.0,
        judge_mass=float(np.median(np.concatenate([mass_ab, mass_ba]))) if n else 0.0,
        judged_by=dict(Counter(rules_ab + rules_ba)),
    )
    out.win_rate, out.ci = win_rate(wins, cfg.evaluation.bootstrap, cfg.evaluation.seed)
    return out


def win_rate(wins: np.ndarray, resamples: int, seed: int) -> tuple[float, tuple[float, float]]:
    """The mean win probability and its bootstrap 95% percentile interval over items."""
    wins = np.asarray(wins, dtype=float)
    if not len(wins):
        return float("nan"), (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = wins[rng.integers(0, len(wins), size=(resamples, len(wins)))].mean(axis=1)
    return float(wins.mean()), (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))


# -- the models ----------------------------------------------------------------------------------------
def n_params(model_dir: str | Path) -> int:
    """Parameters of a checkpoint, read from its safetensors headers (nothing loaded)."""
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), framework="np") as st:
            for k in st.keys():
                total += int(np.prod(st.get_slice(k).get_shape()))
    return total


def train_settings(cfg: KunConfig, base_dir: str | Path) -> TrainSettings:
    """models.chat.train, with LoRA as evaluation.lora says (auto: on for bases over 3B parameters)."""
    s = cfg.models.chat.train
    mode = cfg.evaluation.lora
    want = mode == "on" or (mode == "auto" and n_params(base_dir) > LORA_ABOVE)
    if want and s.lora is None:
        return s.model_copy(update={"lora": LoraSettings()})
    if mode == "off" and s.lora is not None:
        return s.model_copy(update={"lora": None})
    return s


def fine_tuned(
    base_dir: str, base_fingerprint: str, examples: list[tuple[str, str]], settings: TrainSettings, cfg: KunConfig, cache: Path, name: str
) -> tuple[str, bool]:
    """The base fine-tuned on `examples`, from the cache when the same base, examples and settings
    were trained before, under any name. Returns (folder, trained now)."""
    key = hashlib.sha256(
        json.dumps([base_fingerprint, examples, settings.shaping(), cfg.models.keep_default_system], ensure_ascii=False).encode()
    ).hexdigest()[:16]
    out = cache / key
    if (out / "config.json").is_file():
        return str(out), False
    training.fine_tune(base_dir, out, examples, settings, f"evaluation {name}", cfg.models.keep_default_system)
    return str(out), True


def heldout_loss(model_dir: str, pairs: list[tuple[str, str]], cfg: KunConfig) -> tuple[float, int]:
    """Mean negative log-likelihood per answer token of `pairs` (user turn, answer), the prompt
    masked as in training (training.sft_features); and the number of answer tokens. Read by the
    transformers engine whatever the chat role's backend: it needs the answer tokens' own
    log-probabilities, which the engine protocol does not give."""
    from .llm.hf import HFEngine  # torch, only when an evaluation runs

    scorer = HFEngine(EngineSpec(path=model_dir, model_name="heldout-loss", settings=cfg.models.chat))
    keep_system, max_length = cfg.models.keep_default_system, cfg.models.chat.train.max_length
    feats = [training.sft_features(scorer.tokenizer, u, a, max_length, keep_system) for u, a in pairs]
    nll, count = 0.0, 0
    try:
        for start in range(0, len(feats), scorer.batch_size):
            chunk = feats[start : start + scorer.batch_size]
            for f, logp in zip(chunk, scorer.token_logprobs([f["input_ids"] for f in chunk])):
                answer = np.asarray(f["labels"][1:]) != -100  # token t >= 1 is predicted at position t - 1
                nll -= float(logp[answer].sum())
                count += int(answer.sum())
    finally:
        scorer.close()
    return (nll / count if count else float("nan")), count


def answers(engine: Engine, users: list[str], cfg: KunConfig) -> list[str]:
    """Each held-out instruction answered greedily (the models are compared, not sampled)."""
    params = SamplingParams(temperature=0.0, max_tokens=cfg.evaluation.max_tokens, repetition_penalty=cfg.sampling.repetition_penalty)
    rendered = [prompts.render(engine.tokenizer, u, keep_system=cfg.models.keep_default_system) for u in users]
    return [g.text for g in engine.generate(rendered, params)]


@dataclass
class Result:
    heldout: int
    models: list[dict] = field(default_factory=list)  # one row per model: name, examples, loss, win rate, ...
    samples: list[dict] = field(default_factory=list)  # a few held-out items with each model's answer

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.models)


def run(
    seeds: pd.DataFrame,
    releases: dict[str, pd.DataFrame],
    base: dict,
    base_dir: str,
    cfg: KunConfig,
    cache: Path,
    load,
    judge,
) -> Result:
    """Train (or reuse) the baseline and one model per release, measure each on the held-out seeds
    and judge each against the baseline. `releases`: records per source (instruction, input,
    output); `load(path, name)` opens an engine for a model folder; `judge()` the chat model's."""
    held = training.heldout_seeds(seeds)
    users = [training.prompt_of(i, inp) for i, inp in zip(held["instruction"], held["input"])]
    pairs = list(zip(users, held["output"]))
    settings = train_settings(cfg, base_dir)
    releases = {s: r for s, r in releases.items() if len(r)}  # a source with no records adds nothing to evaluate
    candidates = {BASELINE: None}
    if cfg.evaluation.per_source and len(releases) > 1:
        candidates.update({f"seeds+{s}": r for s, r in releases.items()})
    if releases:
        candidates["seeds+" + ("all" if len(releases) > 1 else next(iter(releases)))] = pd.concat(
            list(releases.values()), ignore_index=True
        )
    result = Result(heldout=len(held))
    written: dict[str, list[str]] = {}
    for name, records in candidates.items():
        examples = training.chat_examples(seeds, records)
        path, trained = fine_tuned(base_dir, base["fingerprint"], examples, settings, cfg, cache, name.replace("+", "_"))
        loss, tokens = heldout_loss(path, pairs, cfg)
        engine = load(path, f"eval-{name}")
        try:
            written[name] = answers(engine, users, cfg)
        finally:
            engine.close()
        result.models.append(
            {
                "model": name,
                "examples": len(examples),
                "release_records": 0 if records is None else len(records),
                "heldout_loss": round(loss, 4),
                "heldout_perplexity": round(float(np.exp(loss)), 3) if np.isfinite(loss) else float("nan"),
                "answer_tokens": tokens,
                "lora": settings.lora is not None,
                "trained": "now" if trained else "cached",
            }
        )
    if len(held):
        engine = judge()
        for row in result.models:
            if row["model"] == BASELINE:
                row.update(win_rate=None, win_ci_low=None, win_ci_high=None, position_bias=None, judge_mass=None, judged_by=None)
                continue
            c = compare(engine, users, written[row["model"]], written[BASELINE], cfg)
            row.update(
                win_rate=round(c.win_rate, 4),
                win_ci_low=round(c.ci[0], 4),
                win_ci_high=round(c.ci[1], 4),
                position_bias=round(c.position_bias, 4),
                judge_mass=round(c.judge_mass, 6),
                judged_by=", ".join(f"{r}: {n}" for r, n in sorted(c.judged_by.items())),
            )
    result.samples = [{"instruction": u, **{m: written[m][i] for m in written}} for i, u in enumerate(users[:3])]
    return result
