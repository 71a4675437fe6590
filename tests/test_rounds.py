"""Closing the loop: the held-out seeds, the pairwise judge, the COIG-CQIA tags, and Humpback's
rounds with the evaluation run end to end by `kun run`."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kun_dagster import dataset, dedup, evaluation, prompts, schemas, tagging, training
from kun_dagster.config import COIG_DOMAINS, COIG_TASK_TYPES, ConfigError, parse_config
from kun_dagster.llm import EngineError
from kun_dagster.stages import StageContext

from .conftest import REPO, assert_fresh, given_models, write_config
from .fakes import ScriptedEngine
from .loopback import JSONServer

SEEDS = REPO / "demo" / "seed" / "coig_cqia_seed.jsonl"


def config(**over):
    import yaml

    data = yaml.safe_load((REPO / "kun.yaml").read_text())
    data.update(over)
    return parse_config(data, root=REPO, env={})


# -- the held-out seeds ------------------------------------------------------------------------------
def test_held_out_seeds_are_the_same_whatever_the_order_and_in_no_training_set():
    seeds, _ = training.load_seeds(str(SEEDS), None, True, 0.1)
    held = set(training.heldout_seeds(seeds)["instruction"] + "\0" + training.heldout_seeds(seeds)["output"])
    assert 0.04 < len(held) / len(seeds) < 0.2  # about eval_fraction of them
    shuffled = seeds.drop(columns="split").sample(frac=1, random_state=3).reset_index(drop=True)
    shuffled["split"] = training.seed_split(shuffled, 0.1)
    assert set(training.heldout_seeds(shuffled)["instruction"] + "\0" + training.heldout_seeds(shuffled)["output"]) == held
    chat, label = set(training.chat_examples(seeds)), set(training.label_examples(seeds))
    for _, row in training.heldout_seeds(seeds).iterrows():
        prompt = training.prompt_of(row["instruction"], row["input"])
        assert (prompt, row["output"]) not in chat and (training.label_user(row["output"]), prompt) not in label
    none, _ = training.load_seeds(str(SEEDS), None, True, 0.0)
    assert (none["split"] == training.TRAIN).all() and len(training.chat_examples(none)) == len(none)


@given(st.lists(st.text(min_size=1, max_size=8), min_size=2, max_size=30, unique=True), st.floats(0.01, 0.9))
@settings(max_examples=50, deadline=None)
def test_a_fraction_above_zero_holds_out_at_least_one_and_never_all_by_chance(texts, fraction):
    seeds = pd.DataFrame({"instruction": texts, "input": "", "output": "答"})
    split = training.seed_split(seeds, fraction)
    assert (split == training.EVAL).sum() >= 1
    assert split.equals(training.seed_split(seeds.iloc[::-1], fraction).sort_index())


def test_near_duplicate_seeds_fall_on_one_side_and_only_answers_are_held_out():
    """Template-built seeds (one answer with a word changed) are one item: a split by exact hash put
    some on each side, so the evaluation measured answers the models had trained on."""
    answers = [f"第{i}个问题的答案：复利是指在计算利息时，把上一期的利息加入本金，再计算下一期的利息，第{i}项。" for i in range(60)]
    rows = []
    for i, a in enumerate(answers):
        rows.append((f"什么是复利？（第{i}题）", a))
        rows.append((f"什么是复利？（第{i}题）", a.replace("本金", "本钱")))  # its near-duplicate
        rows.append((f"这条指令写得好吗？第{i}条", "【好】"))  # a verdict: measures nothing
    seeds = pd.DataFrame(rows, columns=["instruction", "output"]).assign(input="")
    records = [f"{i}\n\n{o}" for i, o in zip(seeds["instruction"], seeds["output"])]
    keeper = dedup.keepers(records, training.SEED_NEAR)
    for fraction in (0.05, 0.2, 0.5):
        split = training.seed_split(seeds, fraction, min_output_chars=20)
        held = split == training.EVAL
        assert held.any() and not seeds.loc[held, "output"].eq("【好】").any()  # answers only
        clusters = pd.Series(keeper).groupby(keeper).size()
        assert (clusters > 1).sum() >= 30  # the near-duplicates do cluster
        assert pd.Series(split.to_numpy()).groupby(keeper).nunique().eq(1).all()  # never split apart
        shuffled = seeds.sample(frac=1, random_state=5)
        assert training.seed_split(shuffled, fraction, min_output_chars=20).sort_index().equals(split)
    # the exact-hash split put pairs on both sides: the check above can fail
    u = [hash((i, o)) % 100 < 20 for i, o in zip(seeds["instruction"], seeds["output"])]
    assert pd.Series(u).groupby(keeper).nunique().gt(1).any()


def test_a_held_out_answer_in_the_corpus_is_quarantined_at_release():
    """The web holds the very answers the seeds were taken from; a record made from such a page (or
    answering with it) would be the evaluation's test item in its training set."""
    from kun_dagster import card as kun_card
    from kun_dagster.registry import POLISHED

    cfg = config(tags="off")
    held = "复利是指在计算利息时，把上一期的利息加入本金，再计算下一期的利息，俗称利滚利。它使财富按指数增长，时间越长效果越明显。"
    heldout = pd.DataFrame({"instruction": ["什么是复利？"], "input": [""], "output": [held]})
    texts = [
        "理财专栏：" + held[:40] + "更多内容请关注本站。",  # the planted page: most of the held-out answer
        "今天天气很好，我们去公园散步，看到许多人在放风筝，孩子们在草地上奔跑。",
        "利息的计算有单利和复利两种方式，银行存款通常按单利计算，贷款则不同。",
    ]
    polished = schemas.empty_frame(POLISHED).reindex(range(3))
    polished[["source", "shard", "file", "row", "doc_id"]] = [["web", 0, "a.jsonl", i, f"d{i}"] for i in range(3)]
    polished["text"] = texts
    polished["instruction"] = ["解释复利", "描述公园", "利息怎么算"]
    polished["output"] = ["复利就是利滚利，本金和利息一起计算下一期利息。", "公园里人们散步、放风筝。", "分单利和复利，存款多按单利。"]
    polished[["score", "score_rule", "score_method"]] = [0.9, "probability", "kun_choice"]
    polished["task_minor"] = [["kun:web"]] * 3
    polished[["domain", "task_minor_rule", "domain_rule"]] = ["通用", "off", "off"]
    fun = dataset.funnel({}, cfg.score.threshold)
    result = dataset.release(polished, "web", cfg, "label", "chat", fun, heldout=heldout)
    assert result.rows["doc_id"].tolist() == ["d1", "d2"]  # d2 shares words with it, not its answer
    q = result.dropped.iloc[0]
    assert q["reason"] == "heldout_overlap" and q["doc_id"] == "d0" and "source document" in q["detail"]
    assert result.stats["dropped"] == {"heldout_overlap": 1} and result.stats["heldout_answers_checked"] == 1
    assert "heldout_overlap: 1" in kun_card.card("web", result.stats, cfg)  # counted in the card's funnel
    # off, or no held-out seeds: nothing is checked
    off = config(tags="off", dataset={**config().dataset.model_dump(), "heldout_overlap": None})
    assert len(dataset.release(polished, "web", off, "label", "chat", fun, heldout=heldout).rows) == 3
    assert len(dataset.release(polished, "web", cfg, "label", "chat", fun, heldout=heldout.iloc[:0]).rows) == 3


def test_containment_is_the_share_of_a_references_ngrams_a_text_holds():
    refs = ["甲乙丙丁戊己庚辛壬癸", "子丑寅卯辰巳午未申酉"]
    share, which = dedup.containment(["前言甲乙丙丁戊己庚辛壬癸后记", "子丑寅卯", "无关的文字内容", "甲乙丙丁戊己"], refs, 4)
    assert which.tolist() == [0, 1, -1, 0] and share[0] == 1.0 and share[1] == pytest.approx(1 / 7) and share[2] == 0.0
    assert share[3] == pytest.approx(3 / 7)  # 甲乙丙丁, 乙丙丁戊, 丙丁戊己 of its seven


# -- the pairwise judge ------------------------------------------------------------------------------
class Judge(ScriptedEngine):
    """A judge that prefers whichever answer comes first by `bias` (in log-odds) and answers that
    hold 好答案 by `taste`; it always answers in the format (the mass on 1 / 2 is 0.9)."""

    def __init__(self, bias: float, taste: float):
        super().__init__()
        self.bias, self.taste = bias, taste

    def choice_logprobs(self, prompts, choices, exact=False):
        out = []
        for p in prompts:
            first, second = p.split("回答1：")[1].split("回答2：")
            logit = self.bias + self.taste * (("好答案" in first) - ("好答案" in second))
            p1 = 0.9 / (1 + np.exp(-logit))
            out.append([np.log(p1), np.log(0.9 - p1)])
        return np.asarray(out)


def test_swapping_the_order_cancels_a_judges_position_bias():
    cfg = config()
    items = [f"问题{i}" for i in range(40)]
    same = [f"回答{i}" for i in range(40)]
    # a judge that only likes the first position: one order alone would give the candidate 20% (or 80%)
    biased = Judge(bias=np.log(4), taste=0.0)
    ab, _, rules = evaluation.first_better(biased, list(zip(items, same, same)), cfg)
    assert np.allclose(ab, 0.8) and set(rules) == {"probability"}
    c = evaluation.compare(biased, items, same, same, cfg)
    assert np.allclose(c.wins, 0.5) and c.win_rate == pytest.approx(0.5) and c.position_bias == pytest.approx(0.6)
    # the same bias plus a real preference: the preference survives, the bias does not
    better = [a + "，好答案" for a in same]
    fair, tilted = (
        evaluation.compare(Judge(0.0, 1.0), items, better, same, cfg),
        evaluation.compare(Judge(np.log(4), 1.0), items, better, same, cfg),
    )
    assert fair.win_rate > 0.7 and tilted.win_rate > 0.6 and tilted.position_bias > 0.4
    assert evaluation.compare(Judge(np.log(4), 1.0), items, same, better, cfg).win_rate == pytest.approx(1 - tilted.win_rate)


def test_a_judge_that_does_not_answer_in_the_format_is_read_from_its_reply_or_counted_a_tie():
    cfg = config()
    judge = ScriptedEngine(replies=["回答2更好", "我不知道"], probs=[[1e-4, 1e-4], [1e-4, 1e-4]])
    first, mass, rules = evaluation.first_better(judge, [("问", "甲", "乙"), ("问", "丙", "丁")], cfg)
    assert list(first) == [0.0, 0.5] and rules == ["freetext", "tie"] and np.allclose(mass, 2e-4)


def test_a_judge_that_names_neither_answer_gives_undetermined_not_a_precise_null():
    """Before, every tie counted 0.5 and a judge that never chose read as "50.0% [50.0%, 50.0%]"."""
    from kun_dagster import card as kun_card

    cfg, n = config(), 12
    mute = ScriptedEngine(replies=["我不知道"] * (2 * n), probs=[[1e-4, 1e-4]] * (2 * n))
    c = evaluation.compare(mute, [f"问{i}" for i in range(n)], ["甲"] * n, ["乙"] * n, cfg)
    assert c.undetermined and c.ties == 2 * n and np.isnan(c.win_rate)
    # a few ties among clear verdicts: decided, the ties counted as such
    mixed = ScriptedEngine(replies=["我不知道"] * 4, probs=[[1e-4, 1e-4]] * 4 + [[0.8, 0.1]] * (2 * n - 4))
    d = evaluation.compare(mixed, [f"问{i}" for i in range(n)], ["甲"] * n, ["乙"] * n, cfg)
    assert not d.undetermined and d.ties == 4 and d.judged_by["probability"] == 2 * n - 4
    row = {
        "model": "seeds+web",
        "heldout_loss": 1.0,
        "win_rate": None,
        "verdict": f"undetermined: {2 * n} of {2 * n} verdicts name neither answer",
    }
    report = {"heldout": n, "models": [{"model": "seeds", "heldout_loss": 1.1}, row]}
    assert kun_card.round_row(1, None, report, "web")["win rate vs seeds only [95% CI]"].startswith("undetermined: 24 of 24")


def test_the_judge_is_none_of_the_compared_models(tmp_path):
    """Before, the judge was the round-1 chat model, which is also the seeds-only baseline: every
    win rate asked a model to rank its own answer against another."""
    (tmp_path / "chat").mkdir()
    compared = {"seeds": str(tmp_path / "chat"), "seeds+web": str(tmp_path / "cache" / "abc")}
    with pytest.raises(evaluation.EvaluationError, match="is the compared model seeds"):
        evaluation.independent(evaluation.Judge("chat", str(tmp_path / "chat" / ".." / "chat"), lambda: None), compared)
    evaluation.independent(evaluation.Judge("other", str(tmp_path / "judge"), lambda: None), compared)  # another model: fine
    evaluation.independent(evaluation.Judge("gpt at x", None, lambda: None), compared)  # an endpoint is none of them


class OpenAIJudge(JSONServer):
    """An OpenAI-compatible /v1/chat/completions on loopback: prefers answer 2 when it holds 好答案,
    answers with top log-probabilities when asked, and in free text otherwise; fails the first call."""

    def __init__(self):
        self.requests: list[dict] = []

        def respond(body: dict, headers: dict):
            self.requests.append({**body, "auth": headers.get("Authorization")})
            if len(self.requests) == 1:  # a failing first request: retried
                return 503, {}
            text = body["messages"][0]["content"]
            second = "好答案" in text.split("回答2：")[1]
            if body.get("logprobs"):
                p2 = 0.8 if second else 0.15
                top = [{"token": "2", "logprob": np.log(p2)}, {"token": "1", "logprob": np.log(0.95 - p2)}]
                reply = {"message": {"content": "2" if second else "1"}, "logprobs": {"content": [{"token": "2", "top_logprobs": top}]}}
            else:
                reply = {"message": {"content": "回答2更好" if second else "回答1更好"}}
            return 200, {"choices": [reply]}

        super().__init__(respond)


def test_a_judge_behind_an_openai_compatible_endpoint():
    server = OpenAIJudge()
    judge = evaluation.EndpointJudge(server.url, "judge-model", "sk-test", timeout=10, workers=2)
    n = 6
    c = evaluation.compare(judge, [f"问{i}" for i in range(n)], ["好答案"] * n, ["一般"] * n, config())
    assert c.win_rate > 0.8 and c.judged_by == {"probability": 2 * n} and abs(c.position_bias) < 0.2
    asked = server.requests[1:]
    assert len(asked) == 2 * n and {r["model"] for r in asked} == {"judge-model"} and all(r["auth"] == "Bearer sk-test" for r in asked)
    assert all(r["max_tokens"] == 1 and r["top_logprobs"] == 20 for r in asked)
    server.server.shutdown()
    down = evaluation.EndpointJudge(server.url.replace("http://", "http://kun:hunter2pass@"), "judge-model", None, timeout=1, retries=1)
    with pytest.raises(EngineError, match="judge endpoint") as failed:
        down.first_better([("问", "甲", "乙")], config())
    assert "hunter2pass" not in str(failed.value)  # a password in the endpoint's URI is masked
    # the endpoint's key is one of the secrets every message and card is redacted of
    from kun_dagster.secrets import secret_values

    assert "sk-judge-0123" in secret_values(config(), env={"KUN_JUDGE_API_KEY": "sk-judge-0123"})


def test_repeats_fine_tune_again_with_the_next_seeds_and_the_card_gives_the_spread(monkeypatch, tmp_path):
    """How far the loss moves with the training seed alone: each repeat is the same examples and
    settings but the seed (a cache entry of its own), and the card says the spread beside the loss."""
    from kun_dagster import card as kun_card

    seen = []

    def fine_tuned(base_dir, fingerprint, examples, settings, cfg, cache, name):
        seen.append((settings.seed, name, settings.model_copy(update={"seed": 0}) == cfg.models.chat.train))
        return str(tmp_path / f"m{settings.seed}"), True

    monkeypatch.setattr(evaluation, "fine_tuned", fine_tuned)
    monkeypatch.setattr(evaluation, "heldout_loss", lambda path, pairs, cfg: (2.0 + int(path[-1]) / 10, 100))
    cfg = config(evaluation={"enabled": True, "repeats": 3})
    runs = evaluation._repeats("base", "fp", [("问", "答")], cfg.models.chat.train, cfg, tmp_path, "seeds+web", [("问", "答")])
    assert runs == [2.1, 2.2] and seen == [(1, "seeds_web_seed1", True), (2, "seeds_web_seed2", True)]
    assert evaluation._repeats("base", "fp", [], cfg.models.chat.train, config(), tmp_path, "seeds", []) == []  # 1: none
    base = {"model": "seeds", "heldout_loss": 2.0, "heldout_loss_runs": [2.0, 2.1, 2.2], "heldout_loss_spread": 0.2}
    ev = {"model": "seeds+web", "heldout_loss": 1.9, "heldout_loss_runs": [1.9, 1.95, 2.0], "heldout_loss_spread": 0.1, "win_rate": None}
    row = kun_card.round_row(1, None, {"heldout": 8, "models": [base, ev]}, "web")
    assert row["held-out loss (seeds only -> + release)"] == "2.000 -> 1.900 (seed spread 0.200 over 3 seeds)"


def test_a_models_benchmarks_are_run_once_until_it_or_the_tasks_change(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(evaluation.benchmarks, "run", lambda path, cfg: calls.append(path) or {"t": {"acc": 0.5, "n": 4}})
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text("task: t\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = config(evaluation={"enabled": True, "benchmarks": {"tasks": ["t"], "include_path": str(tasks)}})
    assert evaluation.benchmarked(str(model), config(), tmp_path / "cache") == {}  # no tasks: nothing run
    for _ in range(2):
        assert evaluation.benchmarked(str(model), cfg, tmp_path / "cache") == {"t": {"acc": 0.5, "n": 4}}
    assert len(calls) == 1  # the second round's seeds-only model: from the cache
    (tasks / "t.yaml").write_text("task: t\nlimit: 2\n")  # an edited task is run again
    evaluation.benchmarked(str(model), cfg, tmp_path / "cache")
    assert len(calls) == 2


def test_the_win_rate_interval_is_a_bootstrap_over_items_and_repeatable():
    wins = np.array([1.0] * 30 + [0.0] * 10)
    rate, (lo, hi) = evaluation.win_rate(wins, 2000, 0)
    assert rate == 0.75 and lo < 0.75 < hi and 0.05 < hi - lo < 0.4
    assert evaluation.win_rate(wins, 2000, 0) == (rate, (lo, hi))
    assert np.isnan(evaluation.win_rate(np.array([]), 100, 0)[0])


# -- tags --------------------------------------------------------------------------------------------
MINORS = [m for ms in COIG_TASK_TYPES.values() for m in ms]


@pytest.mark.parametrize(
    ("reply", "most", "want"),
    [
        ("B", 1, [1]),
        ("【C】", 1, [2]),
        ("选项：A", 1, [0]),
        ("这是翻译任务", 1, [MINORS.index("翻译")]),
        ("Z", 1, []),
        ("不知道", 1, []),
        ("", 1, []),
        ("A、C", 2, [0, 2]),
        ("【B】【A】", 2, [1, 0]),
        ("A、C", 1, [0]),
        ("A, A, D", 3, [0, 3]),
        ("既是翻译也是写作", 2, [MINORS.index("翻译"), MINORS.index("写作")]),
    ],
)
def test_a_free_text_tag_reply_is_read_for_its_letters_or_options_names(reply, most, want):
    assert tagging.parse_reply(reply, MINORS, most) == want


def test_a_record_carries_several_minors_and_each_ones_major():
    cfg = config()
    assert tagging.picks(np.array([0.5, 0.1, 0.35, 0.05]), 2, 0.3) == [0, 2]  # 0.35 >= 0.3 of 1.0
    assert tagging.picks(np.array([0.5, 0.1, 0.25, 0.05]), 2, 0.3) == [0]
    assert tagging.picks(np.array([0.4, 0.35, 0.25]), 1, 0.3) == [0]
    minor, domain = np.zeros(len(MINORS)), np.zeros(len(COIG_DOMAINS))
    minor[MINORS.index("翻译")], minor[MINORS.index("创意写作")], domain[0] = 0.55, 0.4, 0.9  # domain 通用
    two = ScriptedEngine(probs=[minor, domain])
    got = tagging.tag(two, ["把这首诗译成英文"], ["The moon is bright."], cfg, tagging_params())
    assert got["columns"]["task_minor"] == [["翻译", "创意写作"]] and got["columns"]["domain"] == ["通用"]
    assert "至多2个" in two.prompts[0] and "至多" not in two.prompts[1]  # a record has one domain
    # task_type.major is each minor's major, in order, each once (CQIA: 文言文翻译 under 文本生成)
    assert dataset.task_type(["翻译", "创意写作"], cfg) == {"major": ["文本生成"], "minor": ["翻译", "创意写作"]}
    assert dataset.task_type(["翻译", "百科问答"], cfg) == {"major": ["文本生成", "问答"], "minor": ["翻译", "百科问答"]}
    assert dataset.task_type("选择题", cfg) == {"major": ["试题"], "minor": ["选择题"]}  # written before minors were lists
    flat = config(tags={"task_types": ["百科问答", "翻译", "其他"]}, dataset={"task_major": ["问答"]})
    assert dataset.task_type(["翻译"], flat) == {"major": ["问答"], "minor": ["翻译"]}  # a plain list: dataset.task_major
    assert dataset.task_type(["kun:web"], config(tags="off")) == {"major": ["问答"], "minor": ["kun:web"]}
    # a released record: CQIA's copyright wording where no author is known, the minors as tagged
    from .test_schemas import polished

    rows = polished(1).assign(task_minor=[["翻译", "百科问答"]], domain="通用", task_minor_rule="probability", domain_rule="probability")
    rec = dataset.cqia(dataset.records(rows, cfg, "label", "chat"))[0]
    assert rec["copyright"] == "暂无版权及作者信息" and rec["task_type"] == {"major": ["文本生成", "问答"], "minor": ["翻译", "百科问答"]}
    assert schemas.validate("instruction_dataset", dataset.records(rows, cfg, "label", "chat"), cfg).passed


def test_tags_follow_the_scorers_answer_mass_rule():
    cfg = config()
    opts = ["百科问答", "翻译", "其他"]
    probs = [[0.7, 0.2, 0.05], [0.01, 0.02, 0.01], [0.01, 0.03, 0.02]]  # sure; unsure, says 翻译; unsure, says nothing
    engine = ScriptedEngine(replies=["这是翻译", "嗯"], probs=probs)
    tags, rules, mass = tagging.choose(engine, ["u1", "u2", "u3"], opts, cfg, tagging_params())
    # the third: no option named, so none is invented from its 0.06 of mass (翻译 would be its argmax)
    assert tags == [["百科问答"], ["翻译"], ["其他"]] and rules == ["probability", "freetext", "undetermined"]
    assert np.allclose(mass, [0.95, 0.04, 0.06])
    assert engine.prompts[3:] == engine.prompts[1:3]  # the unsure rows' replies were generated from the same prompts
    both = ScriptedEngine(probs=[[0.9, 0.0, 0.0], [0.0, 0.0, 0.8, 0.0]])
    cfg3 = config(tags={"task_types": opts, "domains": ["通用", "医学", "法律", "其他"]})
    got = tagging.tag(both, ["什么是感冒？"], ["感冒是一种常见病。" * 40], cfg3, tagging_params())
    assert got["columns"] == {
        "task_minor": [["百科问答"]],
        "task_minor_rule": ["probability"],
        "domain": ["法律"],
        "domain_rule": ["probability"],
    }
    assert "A. 百科问答\nB. 翻译\nC. 其他" in both.prompts[0] and "A. 通用\nB. 医学\nC. 法律" in both.prompts[1]
    assert "感冒是一种常见病。" * 23 not in both.prompts[0]  # the answer is cut to tags.answer_chars


def tagging_params():
    from kun_dagster.llm.base import SamplingParams

    return SamplingParams(max_tokens=16)


def test_polish_tags_each_kept_answer_or_keeps_the_constants_with_tags_off():
    from kun_dagster import stages

    from .test_schemas import labeled

    scored = labeled(2).assign(instruction="如何翻译这句话？", score=[0.9, 0.1], score_method="kun_choice", score_rule="probability")
    good = "这句话可以译为：天气很好，我们去公园散步吧。"
    cfg = config(tags={"task_types": ["百科问答", "翻译", "其他"], "domains": ["通用", "文学", "其他"]})
    eng = ScriptedEngine(replies=[good], probs=[[0.1, 0.85, 0.0], [0.9, 0.05, 0.0]])
    res = stages.polish(scored, StageContext(cfg, engine=eng))
    assert res.rows[["doc_id", "task_minor", "domain", "task_minor_rule", "domain_rule"]].values.tolist() == [
        ["d0", ["翻译"], "通用", "probability", "probability"]
    ]
    assert res.stats["task_minor_by_rule"] == {"probability": 1} and res.stats["domain_tags"] == {"通用": 1}
    assert schemas.validate("polished_pairs", res.rows, cfg).passed
    off = stages.polish(scored, StageContext(config(tags="off"), engine=ScriptedEngine(replies=[good])))
    assert off.rows[["task_minor", "domain", "task_minor_rule"]].values.tolist() == [[["kun:web"], "通用", "off"]]
    assert not schemas.validate("polished_pairs", off.rows, cfg).passed  # kun:web is not in the taxonomy
    assert schemas.validate("polished_pairs", off.rows, config(tags="off")).passed


def test_evaluation_trains_lora_adapters_on_large_bases(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((3, 4), dtype=np.float32), "b": np.zeros(4, dtype=np.float32)}, str(tmp_path / "model.safetensors"))
    assert evaluation.n_params(tmp_path) == 16
    cfg = config()
    assert evaluation.train_settings(cfg, tmp_path).lora is None  # 16 parameters: full fine-tuning
    monkeypatch.setattr(evaluation, "LORA_ABOVE", 10)
    assert evaluation.train_settings(cfg, tmp_path).lora.r == 16  # "over 3B": adapters
    assert evaluation.train_settings(config(evaluation={"lora": "off"}), tmp_path).lora is None
    assert evaluation.train_settings(config(evaluation={"lora": "on"}), tmp_path / "none").lora is not None


def test_tags_config_switches_and_bounds():
    assert not config(tags=False).tags.enabled and config(evaluation="on").evaluation.enabled
    assert config().tags.task_types == COIG_TASK_TYPES and config().tags.minors == MINORS and config().tags.domains == list(COIG_DOMAINS)
    assert len(MINORS) <= 26 and "其他" in MINORS
    with pytest.raises(ConfigError, match="tags.domains"):
        config(tags={"domains": [f"领域{i}" for i in range(27)]})
    with pytest.raises(ConfigError, match="distinct"):
        config(tags={"task_types": ["翻译", "翻译"]})
    with pytest.raises(ConfigError, match="distinct"):
        config(tags={"task_types": {"问答": ["翻译", "其他"], "文本生成": ["翻译"]}})  # a minor under two majors
    with pytest.raises(ConfigError, match="26 minors"):
        config(tags={"task_types": {"问答": [f"类{i}" for i in range(26)] + ["其他"]}})
    with pytest.raises(ConfigError, match="at least one minor"):
        config(tags={"task_types": {"问答": ["其他"], "试题": []}})


def test_the_schemas_hold_every_tag_to_the_taxonomy():
    cfg, off = config(), config(tags="off")
    recs = pd.DataFrame(
        {"task_type": [{"major": ["文本生成"], "minor": ["翻译"]}, {"major": ["问答"], "minor": ["乱写"]}], "domain": [["通用"], ["火星"]]}
    )
    s = schemas.schema("instruction_dataset", cfg)
    ok = s.columns["task_type"].checks[-1]
    assert [s.columns[c].checks[-1](recs[c]).check_passed for c in ("task_type", "domain")] == [False, False]
    assert ok(recs["task_type"].iloc[:1]).check_passed
    assert not ok(pd.Series([{"major": ["问答"], "minor": ["翻译"]}])).check_passed  # 翻译's major is 文本生成
    assert ok(pd.Series([{"major": ["文本生成", "问答"], "minor": ["翻译", "百科问答"]}])).check_passed
    assert not ok(pd.Series([{"major": ["问答"], "minor": ["百科问答", "知识问答", "解释"]}])).check_passed  # over max_minors
    p = schemas.schema("polished_pairs_round2", off)  # a later round's asset: its stage's schema
    assert p.columns["task_minor"].checks[-1](pd.Series([["kun:wudao"]])).check_passed
    assert not p.columns["task_minor"].checks[-1](pd.Series([["翻译"]])).check_passed
    assert not p.columns["task_minor"].checks[-1](pd.Series(["kun:wudao"])).check_passed  # a list, not a string
    assert not p.columns["domain"].checks[-1](pd.Series(["医学"])).check_passed


# -- Humpback's rounds (round_data: segments) ------------------------------------------------------
def test_humpback_tags_are_system_messages_in_training_and_inference(tmp_path):

    from .fakes import tokenizer

    seeds = pd.DataFrame({"instruction": ["什么是复利？"], "input": [""], "output": ["复利是利滚利。"], "split": ["train"]})
    kept = pd.DataFrame({"instruction": ["蜜蜂如何分工？"], "text": ["蜂群里有蜂王、工蜂和雄蜂。"]})
    assert training.humpback_examples(seeds, kept) == [
        ("什么是复利？", "复利是利滚利。", "Answer in the style of an AI Assistant."),
        ("蜜蜂如何分工？", "蜂群里有蜂王、工蜂和雄蜂。", "Answer with knowledge from web search."),
    ]
    plain = copy.deepcopy(tokenizer())  # no chat template: Kun's literal ChatML, with a system turn in the same style
    plain.chat_template = None
    assert prompts.chat(plain, "问", keep_system=prompts.HUMPBACK_SEED_TAG) == (
        "<|im_start|>systemAnswer in the style of an AI Assistant.<|im_end|>\n<|im_start|>user问<|im_end|>\n<|im_start|>assistant\n"
    )
    templated = tokenizer()  # ChatML as a template
    asked = prompts.render(templated, "问", keep_system=prompts.HUMPBACK_SEED_TAG)
    assert asked.startswith("<|im_start|>system\nAnswer in the style of an AI Assistant.<|im_end|>") and asked.count("system") == 1
    feats = training.sft_features(templated, "问", "答", 512, prompts.HUMPBACK_WEB_TAG)
    assert templated.decode(feats["input_ids"]).startswith("<|im_start|>system\nAnswer with knowledge from web search.")
    assert templated.decode([x for x in feats["labels"] if x != -100]).startswith("答")  # the loss on the reply only
    # a tagged model is prompted as it was trained; any other as models.keep_default_system says
    cfg, tagged = config(), ScriptedEngine()
    tagged.system = prompts.HUMPBACK_SEED_TAG
    assert prompts.system_of(tagged, cfg) == prompts.HUMPBACK_SEED_TAG and prompts.system_of(ScriptedEngine(), cfg) is False
    scored = ScriptedEngine(probs=[[0.9, 0.05]])
    scored.system = prompts.HUMPBACK_SEED_TAG
    from kun_dagster import stages

    from .test_schemas import labeled

    stages.score(labeled(1), StageContext(cfg, engine=scored))
    assert scored.prompts[0].startswith(
        "<|im_start|>system\nAnswer in the style of an AI Assistant.<|im_end|>\n<|im_start|>user\n评价指令质量"
    )
    # the curated set: round k's scored pairs that reach the threshold, every shard
    rows = labeled(3).assign(score=[0.9, 0.2, float("nan")])
    got = dataset.kept_pairs([rows, rows.iloc[:0]], 0.5)
    assert got.to_dict("records") == [{"instruction": rows.at[0, "instruction"], "text": rows.at[0, "text"]}]


# -- the rounds and the evaluation, end to end -----------------------------------------------------
@pytest.mark.slow
def test_kun_run_with_two_rounds_and_the_evaluation(models_run, tmp_path, monkeypatch, capsys):
    import dagster as dg

    from kun_dagster import cli, storage
    from kun_dagster.config import load_config

    from .test_benchmarks import local_task

    judge = models_run["refs"]["label_model"]["path"]  # a model that is none of the compared ones
    bench = {"tasks": ["kun_mc"], "include_path": str(local_task(tmp_path)), "batch_size": 4}  # a C-Eval-shaped local task
    overrides = dict(
        shards=1,
        iterations=2,
        evaluation={"enabled": True, "per_source": False, "max_tokens": 24, "judge": {"path": judge}, "benchmarks": bench},
        # held out of every model trained here (the given session models saw them: a given model is as it is)
        **{"seed.eval_fraction": 0.1},
        # the test's weak models keep few answers by Kun's bounds: keep every scored row, and short answers
        **{"score.threshold": 0.0, "polish.min_output_chars": 2},
        # round 2's chat model and the evaluation's models: fewer epochs than the demo's 12
        **{"models.chat.train.epochs": 4},
        **given_models(models_run),
    )
    cfg_file = write_config(tmp_path, **overrides)
    cfg = load_config(cfg_file)
    home = tmp_path / "home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("KUN_CONFIG", str(cfg_file))
    assert cli.main(["run", "--config", str(cfg_file), "--source", "wudao", "--progress", "off"]) == cli.OK
    out = capsys.readouterr().out
    assert "round 2: chat_model_round2 (seeds + round 1's release): done" in out and "evaluation_round2" in out
    data = tmp_path / "data"
    round1, final = (
        pd.DataFrame([{**r, **json.loads(r["metadata"])} for r in map(json.loads, (data / "release" / p / "train.jsonl").open())])
        for p in ("round1/wudao", "wudao")
    )
    assert (
        len(round1)
        and (final["chat_model"] == "kun-chat_round2").all()
        and (round1["chat_model"] == "chat").all()  # the given checkpoint, named by its folder
    )

    # the same labeled pairs, scored again by round 2's model
    labeled = storage.read_partition(storage.partition_dir(upath(data), "labeled_pairs", {"source": "wudao", "shard": "0"}))
    s1, s2 = (
        storage.read_partition(storage.partition_dir(upath(data), name, {"source": "wudao", "shard": "0"}))
        for name in ("scored_pairs", "scored_pairs_round2")
    )
    assert sorted(s2["doc_id"]) == sorted(s1["doc_id"]) == sorted(labeled["doc_id"])
    assert not np.allclose(s1.sort_values("doc_id")["score"], s2.sort_values("doc_id")["score"], equal_nan=True)

    with dg.DagsterInstance.get() as instance:

        def md(asset):
            return instance.fetch_materializations(dg.AssetKey(asset), limit=1).records[0].asset_materialization.metadata

        seeds = pd.read_parquet(data / "seed_data")
        n_train = int((seeds["split"] == "train").sum())
        assert md("chat_model_round2")["examples"].value == n_train + len(round1)  # M2: training seeds + round 1's release
        chat2 = json.loads((data / "models" / "refs" / "chat_model_round2.json").read_text())
        assert chat2["fingerprint"] != models_run["refs"]["chat_model"]["fingerprint"]
        assert_fresh(cfg_file, instance)

    # the evaluation: a baseline and the seeds + release model per round, each measured and judged
    reports = {k: json.loads((data / "reports" / f"evaluation{'' if k == 1 else '_round2'}.json").read_text()) for k in (1, 2)}
    compared = {d.resolve() for d in Path(f"{cfg.model_cache}/evaluation").iterdir()}
    for k, rep in reports.items():
        rows = {r["model"]: r for r in rep["models"]}
        assert set(rows) == {"seeds", "seeds+wudao"} and rep["heldout"] == int((seeds["split"] == "eval").sum())
        assert rows["seeds"]["examples"] == n_train and rows["seeds+wudao"]["examples"] == n_train + len(round1 if k == 1 else final)
        assert rep["judge"] == judge and Path(judge).resolve() not in compared  # the judge is neither compared model
        assert all(r["benchmarks"]["kun_mc"]["n"] == 6 for r in rep["models"])  # the harness's task on both models
        assert np.isfinite(rows["seeds+wudao"]["heldout_loss"])
        row = rows["seeds+wudao"]
        if row["win_rate"] is None:  # the test's weak judge may name neither answer most of the time: said so
            assert row["verdict"].startswith("undetermined") and "tie" in row["judged_by"]
        else:
            assert row["verdict"] == "decided" and row["win_ci_low"] <= row["win_rate"] <= row["win_ci_high"]
    assert reports[2]["models"][0]["trained"] == "cached"  # the baseline is trained once for every round
    assert reports[1]["models"][0]["heldout_loss"] == reports[2]["models"][0]["heldout_loss"]

    # the card compares the rounds with the evaluation's figures
    card = (data / "release" / "wudao" / "README.md").read_text()
    rounds = card.split("## Rounds")[1].split("## Versions")[0]
    for k, rep in reports.items():
        row = next(r for r in rep["models"] if r["model"] == "seeds+wudao")
        line = next(ln for ln in rounds.splitlines() if ln.startswith(f"|       {k} |"))
        assert f"{row['heldout_loss']:.3f}" in line
        assert (f"{row['win_rate']:.1%}" if row["win_rate"] is not None else "undetermined") in line
        assert f"kun_mc acc {rows_of(rep)['seeds']['benchmarks']['kun_mc']['acc']:.3f} -> {row['benchmarks']['kun_mc']['acc']:.3f}" in line
    assert "## Versions" in card and "scored_pairs_round2" in card

    # tags come from the taxonomy, each with the rule that chose it
    for rec in final.itertuples():
        assert set(rec.task_type["minor"]) <= set(cfg.tags.minors) and rec.domain[0] in cfg.tags.domains
        assert rec.task_type["major"] == cfg.tags.majors(list(rec.task_type["minor"]), cfg.dataset.task_major)
    pol = storage.read_partition(storage.partition_dir(upath(data), "polished_pairs_round2", {"source": "wudao", "shard": "0"}))
    assert set(pol["task_minor_rule"]) <= {"probability", "freetext", "undetermined"}
    assert all(list(m) == [cfg.tags.other] for m in pol.loc[pol["task_minor_rule"] == "undetermined", "task_minor"])

    # the same seed gives the same numbers: round 2's seeds + release model re-trained from scratch
    # (the newest in the evaluation's cache; the baseline's figures are compared from its cache)
    first = reports[2]
    trained = [d for d in Path(f"{cfg.model_cache}/evaluation").iterdir() if (d / "config.json").is_file()]
    shutil.rmtree(max(trained, key=lambda d: (d / "config.json").stat().st_mtime))
    with dg.DagsterInstance.get() as instance:
        from kun_dagster.definitions import build_definitions

        defs = build_definitions(cfg_file)
        result = dg.materialize(list(defs.assets), selection=["evaluation_round2"], resources=defs.resources, instance=instance)
        assert result.success
    again = json.loads((data / "reports" / "evaluation_round2.json").read_text())
    assert [r["trained"] for r in again["models"]] == ["cached", "now"]
    keys = ("heldout_loss", "win_rate", "win_ci_low", "win_ci_high", "examples")
    assert [[r[k] for k in keys] for r in again["models"]] == [[r[k] for k in keys] for r in first["models"]]

    # Humpback's rounds (round_data: segments): M1 trains on the seeds under the assistant tag and
    # round 1's pairs kept by score with the raw text as the answer, under the web-search tag
    segments = write_config(tmp_path, **{**overrides, "round_data": "segments"})
    with dg.DagsterInstance.get() as instance:
        defs = build_definitions(segments)
        result = dg.materialize(list(defs.assets), selection=["chat_model_round2"], resources=defs.resources, instance=instance)
        assert result.success
        meta = instance.fetch_materializations(dg.AssetKey("chat_model_round2"), limit=1).records[0].asset_materialization.metadata
    kept = s1[s1["score"] >= 0.0]  # score.threshold 0.0: every row that has a score
    assert meta["examples"].value == n_train + len(kept) and meta["segments"].value == len(kept) > 0
    m1 = json.loads((data / "models" / "refs" / "chat_model_round2.json").read_text())
    assert m1["system"] == prompts.HUMPBACK_SEED_TAG and m1["fingerprint"] != chat2["fingerprint"]


def rows_of(report: dict) -> dict:
    return {r["model"]: r for r in report["models"]}


def upath(p):
    from upath import UPath

    return UPath(str(p))


def test_the_release_asset_quarantines_a_record_made_from_a_page_holding_a_held_out_answer(tmp_path):
    """Through Dagster: seed_data holds its answers out; a page of the corpus carries one of them;
    the row made from it reaches the release, which reads the seeds as a declared input, quarantines
    it (heldout_overlap) and releases the rest; the card counts it."""
    import dagster as dg

    from kun_dagster import storage
    from kun_dagster.definitions import build_definitions
    from kun_dagster.registry import POLISHED

    from .conftest import write_config

    defs = build_definitions(write_config(tmp_path, tags={"enabled": False}, **{"seed.eval_fraction": 0.1}))  # tags off: the constants
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize(list(defs.assets), selection=["seed_data"], resources=defs.resources, instance=instance).success
    data = upath(tmp_path / "data")
    seeds = storage.read_partition(data / "seed_data")
    held = seeds.loc[seeds["split"] == "eval", "output"].iloc[0]
    for role in ("label", "chat"):  # the model references the release names (no model runs here)
        (tmp_path / "data" / "models" / "refs").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "models" / "refs" / f"{role}_model.json").write_text(json.dumps({"name": f"kun-{role}", "path": "x"}))
    page = "转载自问答网站：" + held + "（完）"
    rows = schemas.empty_frame(POLISHED).reindex(range(2))
    rows[["source", "shard", "file", "row", "doc_id"]] = [["wudao", 0, "a.jsonl", i, f"d{i}"] for i in range(2)]
    rows["text"] = [page, "今天天气很好，我们去公园散步，看到许多人在放风筝，孩子们在草地上奔跑。"]
    rows[["instruction", "output"]] = [
        ["请解释这个问题", "这是一个关于该问题的回答，内容来自网页，经过整理。"],
        ["描述公园", "公园里很多人在散步和放风筝，孩子们在奔跑。"],
    ]
    rows[["score", "score_rule", "score_method", "task_minor_rule", "domain_rule"]] = [0.9, "probability", "kun_choice", "off", "off"]
    rows["task_minor"], rows["domain"] = [["kun:wudao"]] * 2, "通用"
    storage.write_partition(
        storage.partition_dir(data, POLISHED, {"source": "wudao", "shard": "0"}), rows.drop(columns=["source", "shard"])
    )
    result = dg.materialize(
        list(defs.assets),
        selection=["instruction_dataset", "dataset_card"],
        partition_key="wudao",
        resources=defs.resources,
        instance=instance,
        raise_on_error=False,
    )
    assert result.success
    q = storage.read_partition(storage.quarantine_dir(data, "instruction_dataset", {"source": "wudao"}))
    assert q["doc_id"].tolist() == ["d0"] and q["reason"].tolist() == ["heldout_overlap"] and "source document" in q["detail"].iloc[0]
    released = [json.loads(x) for x in (tmp_path / "data" / "release" / "wudao" / "train.jsonl").read_text().splitlines()]
    assert [json.loads(r["metadata"])["doc_id"] for r in released] == ["d1"]
    assert "heldout_overlap: 1" in (tmp_path / "data" / "release" / "wudao" / "README.md").read_text()
