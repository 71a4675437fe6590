"""Does the made data help? Kun judges its data by fine-tuning on it; so does the evaluation asset.

The configured base is fine-tuned with one set of training settings (models.chat.train) on the
training seeds alone (the baseline) and on the training seeds + a release (each source's, and all
together). Each model is then measured on the held-out seeds (seed.eval_fraction, in no training
set):

- loss: the mean negative log-likelihood of the held-out answers' tokens given their instructions
  (the SFT loss, prompt masked), and its perplexity;
- a pairwise judgement by an independent judge (evaluation.judge: a checkpoint, or a model behind
  an OpenAI-compatible endpoint; never one of the compared models, whose self-preference would
  favour its own answers): for each held-out instruction, the candidate's answer and the
  baseline's, in both orders; the judge's probability that the first is better is read from the
  replies 1 / 2 at its reply's opening (one decode step), by the scorer's rule: where the judge
  puts under score.min_answer_mass on them, its free-text verdict is parsed instead, and a reply
  naming neither is a tie. A position bias (the judge preferring whichever comes first) cancels in
  the mean of the two orders: win = (P(first | B, A) + 1 - P(first | A, B)) / 2. The win rate is
  the mean over items (a tie counting half), with a bootstrap 95% interval over items; where ties
  are most of the verdicts, the result is undetermined. No judge configured: no win rate.

The baseline is the chat model when it was trained here on the training seeds with the same
settings (no duplicate fine-tune); otherwise the base is fine-tuned on them. Trained models are
cached by their content (base fingerprint, examples, settings): a second round or a rerun
re-trains only what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import benchmarks, prompts, storage, training
from .config import KunConfig, LoraSettings, TrainSettings
from .llm.base import Engine, EngineSpec, SamplingParams
from .llm.endpoints import Endpoints

log = logging.getLogger(__name__)

BASELINE = "seeds"
PROBABILITY, FREETEXT, TIE = "probability", "freetext", "tie"  # how a verdict was read
JUDGE_CHOICES = ("1", "2")  # read at the reply's opening, as the prompt asks ("只回答 1 或 2")
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
    if isinstance(judge, EndpointJudge):
        return judge.first_better(items, cfg)
    keep_system = prompts.system_of(judge, cfg)  # a Humpback-tagged round model is prompted as it was trained
    rendered, answers = prompts.choice_prompts(judge.tokenizer, [judge_user(*it) for it in items], JUDGE_CHOICES, "", keep_system)
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


class EndpointJudge:
    """A judge behind an OpenAI-compatible chat endpoint (a hosted judge, `vllm serve`): the reply's
    first token's top log-probabilities give P(1) and P(2); where their mass is under
    score.min_answer_mass, a short greedy reply is parsed. Requests run a few at a time, each
    retried on a dropped connection or a 5xx (llm.endpoints); the key is read from the environment,
    never logged."""

    def __init__(self, endpoint: str, model: str, api_key: str | None, timeout: float, workers: int = 8, retries: int = 3):
        self.model = model
        self.endpoint = Endpoints([endpoint], f"judge endpoint ({model})", api_key, timeout, retries, max_in_flight=workers)

    def _body(self, user: str, max_tokens: int, logprobs: bool) -> dict:
        body = {"model": self.model, "messages": [{"role": "user", "content": user}], "max_tokens": max_tokens, "temperature": 0}
        return body | ({"logprobs": True, "top_logprobs": 20} if logprobs else {})

    @staticmethod
    def _probabilities(reply: dict) -> tuple[float, float]:
        top = reply["choices"][0].get("logprobs") or {}
        first = (top.get("content") or [{}])[0].get("top_logprobs") or []
        p = {c: 0.0 for c in JUDGE_CHOICES}
        for t in first:
            if t.get("token", "").strip() in p:
                p[t["token"].strip()] += float(np.exp(t["logprob"]))
        return p["1"], p["2"]

    def first_better(self, items: list[tuple[str, str, str]], cfg: KunConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
        users = [judge_user(*it) for it in items]
        asked = self.endpoint.map("/chat/completions", [self._body(u, 1, True) for u in users], self._probabilities)
        p = np.asarray(asked, dtype=float).reshape(-1, 2)
        mass = p.sum(axis=1)
        first = np.where(mass > 0, p[:, 0] / np.where(mass > 0, mass, 1), 0.5)
        rules = [PROBABILITY if m >= cfg.score.min_answer_mass else FREETEXT for m in mass]
        low = [i for i, r in enumerate(rules) if r == FREETEXT]
        replies = self.endpoint.map(
            "/chat/completions", [self._body(users[i], 16, False) for i in low], lambda r: r["choices"][0]["message"]["content"] or ""
        )
        for i, text in zip(low, replies):
            first[i] = parse_verdict(text)
            rules[i] = FREETEXT if first[i] != 0.5 else TIE
        return first, mass, rules

    def close(self) -> None:
        self.endpoint.close()


@dataclass
class Judge:
    """The evaluation's judge as the asset hands it over: its name for the report, its checkpoint
    (None behind an endpoint: it is not one of the compared models by construction), and how to open it."""

    name: str
    path: str | None
    open: Callable[[], Any]


def independent(judge: Judge, compared: dict[str, str]) -> None:
    """A judge must be none of the compared models: judging its own answers against another's, a
    model prefers its own (the baseline was the judge before, so every win rate leaned to it)."""
    if judge.path is None:
        return
    mine = Path(judge.path).resolve()
    same = [name for name, path in compared.items() if Path(path).resolve() == mine]
    if same:
        raise EvaluationError(
            f"evaluation.judge ({judge.path}) is the compared model {same[0]}: a model judging its own answers "
            "favours them. Name a model that is none of them (evaluation.judge.path or .endpoint)."
        )


class EvaluationError(ValueError):
    """The evaluation cannot mean what it says (its judge is one of the compared models)."""


@dataclass
class Comparison:
    wins: np.ndarray  # per item: the candidate's win probability, both orders averaged
    position_bias: float  # mean P(first) + P(first, swapped) - 1: 0 none, > 0 the first position preferred
    judge_mass: float  # median mass on the answers 1 / 2
    judged_by: dict  # rule -> verdicts read by it (probability, freetext, tie)
    win_rate: float = 0.0
    ci: tuple[float, float] = (0.0, 0.0)

    @property
    def ties(self) -> int:
        return self.judged_by.get(TIE, 0)

    @property
    def undetermined(self) -> bool:
        """Most verdicts name neither answer: their 0.5s would read as a precise null, so no win rate."""
        verdicts = sum(self.judged_by.values())
        return not verdicts or 2 * self.ties > verdicts


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
    if not out.undetermined:
        out.win_rate, out.ci = win_rate(wins, cfg.evaluation.bootstrap, cfg.evaluation.seed)
    else:
        out.win_rate, out.ci = float("nan"), (float("nan"), float("nan"))
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
    judge: str | None = None  # the judge's checkpoint or endpoint model; None: no win rates
    models: list[dict] = field(default_factory=list)  # one row per model: name, examples, loss, win rate, ...
    samples: list[dict] = field(default_factory=list)  # a few held-out items with each model's answer

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.models)


def benchmarked(model_dir: str, cfg: KunConfig, cache: Path) -> dict:
    """benchmarks.run, kept under the evaluation's cache by the model folder (its path and when it
    was written), the tasks' settings and their files: the seeds-only model is benchmarked once for
    every round, as it is trained once (C-Eval on a large model is hours)."""
    b = cfg.evaluation.benchmarks
    if not b.tasks:
        return {}
    folder = Path(model_dir).resolve()
    written = (folder / "config.json").stat().st_mtime_ns if (folder / "config.json").exists() else 0
    tasks = (
        sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in Path(b.include_path).rglob("*") if f.is_file())
        if b.include_path
        else []
    )
    key = hashlib.sha256(json.dumps([str(folder), written, b.model_dump(mode="json"), tasks, cfg.evaluation.seed]).encode()).hexdigest()[
        :16
    ]
    kept = cache / "benchmarks" / f"{key}.json"
    if kept.is_file():
        return json.loads(kept.read_text(encoding="utf-8"))
    got = benchmarks.run(str(folder), cfg)
    storage.write_atomic(kept, json.dumps(got).encode("utf-8"))
    return got


def _repeats(base_dir, fingerprint, examples, settings, cfg: KunConfig, cache: Path, name: str, pairs) -> list[float]:
    """The held-out loss of `evaluation.repeats` - 1 more fine-tunes on the same examples, each with
    the next training seed: the spread says how much of a difference the seed alone makes."""
    out = []
    for r in range(1, cfg.evaluation.repeats):
        again = settings.model_copy(update={"seed": settings.seed + r})
        path, _ = fine_tuned(base_dir, fingerprint, examples, again, cfg, cache, f"{name.replace('+', '_')}_seed{again.seed}")
        out.append(heldout_loss(path, pairs, cfg)[0])
    return out


def _candidates(releases: dict[str, pd.DataFrame], cfg: KunConfig) -> dict[str, pd.DataFrame | None]:
    """The models to train: the baseline (seeds only), each source's release and all together."""
    releases = {s: r for s, r in releases.items() if len(r)}  # a source with no records adds nothing to evaluate
    out: dict[str, pd.DataFrame | None] = {BASELINE: None}
    if cfg.evaluation.per_source and len(releases) > 1:
        out.update({f"seeds+{s}": r for s, r in releases.items()})
    if releases:
        out["seeds+" + ("all" if len(releases) > 1 else next(iter(releases)))] = pd.concat(list(releases.values()), ignore_index=True)
    return out


def _judged(result: Result, judge: Judge | None, users: list[str], written: dict[str, list[str]], cfg: KunConfig) -> None:
    """Each candidate's answers against the baseline's, by the judge; without one, no win rate."""
    engine = judge.open() if judge is not None and users else None
    try:
        for row in result.models:
            row.update(win_rate=None, win_ci_low=None, win_ci_high=None, position_bias=None, judge_mass=None, judged_by=None)
            if row["model"] == BASELINE:
                row["verdict"] = None
                continue
            if engine is None:
                row["verdict"] = "not judged: no evaluation.judge" if judge is None else "not judged: no held-out seeds"
                continue
            c = compare(engine, users, written[row["model"]], written[BASELINE], cfg)
            row.update(
                verdict="decided"
                if not c.undetermined
                else f"undetermined: {c.ties} of {sum(c.judged_by.values())} verdicts name neither answer",
                position_bias=round(c.position_bias, 4),
                judge_mass=round(c.judge_mass, 6),
                judged_by=", ".join(f"{r}: {n}" for r, n in sorted(c.judged_by.items())),
            )
            if not c.undetermined:
                row.update(win_rate=round(c.win_rate, 4), win_ci_low=round(c.ci[0], 4), win_ci_high=round(c.ci[1], 4))
    finally:
        if engine is not None:
            engine.close()


def run(
    seeds: pd.DataFrame,
    releases: dict[str, pd.DataFrame],
    base: dict,
    base_dir: str,
    cfg: KunConfig,
    cache: Path,
    load,
    judge: Judge | None,
    baseline_dir: str | None = None,
) -> Result:
    """Train (or reuse) the baseline and one model per release, measure each on the held-out seeds
    and have the judge compare each with the baseline. `releases`: records per source
    (instruction, input, output); `load(path, name)` opens an engine for a model folder;
    `baseline_dir`: the chat model, where it is the seeds-only fine-tune (no second one is trained)."""
    held = training.heldout_seeds(seeds)
    users = [training.prompt_of(i, inp) for i, inp in zip(held["instruction"], held["input"])]
    pairs = list(zip(users, held["output"]))
    settings = train_settings(cfg, base_dir)
    result = Result(heldout=len(held), judge=judge.name if judge is not None else None)
    written: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    for name, records in _candidates(releases, cfg).items():
        examples = training.chat_examples(seeds, records)
        if name == BASELINE and baseline_dir is not None:
            paths[name], trained = baseline_dir, "the chat model"
        else:
            paths[name], now = fine_tuned(base_dir, base["fingerprint"], examples, settings, cfg, cache, name.replace("+", "_"))
            trained = "now" if now else "cached"
        if judge is not None:
            independent(judge, paths)  # before any generation: fail at once
        loss, tokens = heldout_loss(paths[name], pairs, cfg)
        runs = [loss] + _repeats(base_dir, base["fingerprint"], examples, settings, cfg, cache, name, pairs)
        scores = benchmarked(paths[name], cfg, cache)
        engine = load(paths[name], f"eval-{name}")
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
                **(
                    {"heldout_loss_runs": [round(x, 4) for x in runs], "heldout_loss_spread": round(max(runs) - min(runs), 4)}
                    if len(runs) > 1
                    else {}
                ),
                "answer_tokens": tokens,
                "lora": settings.lora is not None,
                "trained": trained,
                **({"benchmarks": scores} if scores else {}),
            }
        )
    _judged(result, judge, users, written, cfg)
    result.samples = [{"instruction": u, **{m: written[m][i] for m in written}} for i, u in enumerate(users[:3])]
    return result
