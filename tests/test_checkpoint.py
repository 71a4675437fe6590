"""Per-batch checkpoints of engine calls (kun_dagster.llm.checkpoint)."""

import numpy as np
import pytest
from upath import UPath

from kun_dagster.llm.base import Generation, SamplingParams
from kun_dagster.llm.checkpoint import Checkpointed


class CountingEngine:
    """Deterministic replies; records every prompt it computed; can fail at a given call."""

    backend, model_name, tokenizer = "counting", "m", None

    def __init__(self, fail_at_call: int | None = None):
        self.calls: list[list[str]] = []
        self.fail_at_call = fail_at_call

    def _call(self, prompts):
        if self.fail_at_call is not None and len(self.calls) == self.fail_at_call:
            raise RuntimeError("engine died")
        self.calls.append(list(prompts))

    def generate(self, prompts, params):
        self._call(prompts)
        return [Generation(f"{p}!{params.temperature}", len(p), "stop") for p in prompts]

    def choice_logprobs(self, prompts, choices, exact=False):
        self._call(prompts)
        return np.log([[len(p) / 10, 1 - len(p) / 10] for p in prompts]) - (1.0 if exact else 0.0)

    def perplexity(self, texts):
        self._call(texts)
        return np.asarray([float(len(t)) if t != "nan" else np.nan for t in texts])


PROMPTS = [f"p{i}" for i in range(10)]
PARAMS = SamplingParams(temperature=0.5)


def test_results_equal_the_engines_and_a_rerun_computes_nothing(tmp_path):
    d = UPath(tmp_path) / "staging"
    first = Checkpointed(CountingEngine(), d, rows=4)
    gens = first.generate(PROMPTS, PARAMS)
    assert gens == CountingEngine().generate(PROMPTS, PARAMS)
    assert [len(c) for c in first.engine.calls] == [4, 4, 2] and first.stats == {
        "checkpoint_batches_reused": 0,
        "checkpoint_batches_computed": 3,
    }
    again = Checkpointed(CountingEngine(), d, rows=4)
    assert again.generate(PROMPTS, PARAMS) == gens
    assert again.engine.calls == [] and again.reused == 3


def test_a_crash_resumes_at_the_first_unfinished_batch(tmp_path):
    d = UPath(tmp_path)
    with pytest.raises(RuntimeError, match="engine died"):
        Checkpointed(CountingEngine(fail_at_call=2), d, rows=3).generate(PROMPTS, PARAMS)
    assert len(list(d.glob("generate-*.parquet"))) == 2
    resumed = Checkpointed(CountingEngine(), d, rows=3)
    assert resumed.generate(PROMPTS, PARAMS) == CountingEngine().generate(PROMPTS, PARAMS)
    assert resumed.engine.calls == [PROMPTS[6:9], PROMPTS[9:]] and resumed.reused == 2


def test_changed_input_or_parameters_are_computed_afresh(tmp_path):
    d = UPath(tmp_path)
    Checkpointed(CountingEngine(), d, rows=4).generate(PROMPTS, PARAMS)
    edited = PROMPTS[:5] + ["changed"] + PROMPTS[6:]
    redo = Checkpointed(CountingEngine(), d, rows=4)
    assert redo.generate(edited, PARAMS)[5].text == "changed!0.5"
    assert redo.engine.calls == [edited[4:8]]  # only the batch that holds the edit
    hotter = Checkpointed(CountingEngine(), d, rows=4)
    assert hotter.generate(PROMPTS, SamplingParams(temperature=0.9))[0].text == "p0!0.9" and len(hotter.engine.calls) == 3


def test_scores_and_perplexities_round_trip_including_nan(tmp_path):
    d = UPath(tmp_path)
    probs = Checkpointed(CountingEngine(), d, rows=4).choice_logprobs(PROMPTS, ["a", "b"])
    back = Checkpointed(CountingEngine(), d, rows=4)
    np.testing.assert_array_equal(back.choice_logprobs(PROMPTS, ["a", "b"]), probs)
    assert back.engine.calls == [] and probs.shape == (10, 2)
    assert (back.choice_logprobs(PROMPTS, ["a", "b"], exact=True) < probs).all()  # the exact path is its own batches
    assert len(back.engine.calls) == 3
    texts = ["ab", "nan", "abcd"]
    ppl = Checkpointed(CountingEngine(), d, rows=2).perplexity(texts)
    again = Checkpointed(CountingEngine(), d, rows=2).perplexity(texts)
    np.testing.assert_array_equal(again, ppl)  # NaN where NaN
    assert np.isnan(again[1]) and again[0] == 2.0


def test_an_all_empty_generation_batch_is_not_kept(tmp_path):
    class Mute(CountingEngine):
        def generate(self, prompts, params):
            self._call(prompts)
            return [Generation("", 0, "stop") for _ in prompts]

    d = UPath(tmp_path)
    Checkpointed(Mute(), d, rows=4).generate(PROMPTS, PARAMS)
    assert list(d.glob("*.parquet")) == []  # the stage fails on it; a retry must ask the model again


def test_a_retrained_model_of_the_same_name_recomputes_every_batch(tmp_path):
    d = UPath(tmp_path)
    old = CountingEngine()
    old.fingerprint = "weights-a"
    Checkpointed(old, d, rows=4).generate(PROMPTS, PARAMS)
    same = CountingEngine()
    same.fingerprint = "weights-a"
    again = Checkpointed(same, d, rows=4)
    again.generate(PROMPTS, PARAMS)
    assert again.reused == 3 and same.calls == []
    new = CountingEngine()  # same model_name "m", other weights
    new.fingerprint = "weights-b"
    fresh = Checkpointed(new, d, rows=4)
    fresh.generate(PROMPTS, PARAMS)
    assert fresh.reused == 0 and len(new.calls) == 3


def test_progress_shows_prompts_per_partition_when_the_cli_turns_it_on(tmp_path, capsys):
    from kun_dagster import progress

    Checkpointed(CountingEngine(), UPath(tmp_path) / "a", rows=4, label="labeled_pairs web/0").generate(PROMPTS, PARAMS)
    assert "labeled_pairs" not in capsys.readouterr().err  # off by default: Dagster's own runs draw nothing
    progress.show(True)
    try:
        Checkpointed(CountingEngine(), UPath(tmp_path) / "b", rows=4, label="labeled_pairs web/0").generate(PROMPTS, PARAMS)
    finally:
        progress.show(False)
    err = capsys.readouterr().err
    assert "labeled_pairs web/0 generate" in err and "10/10" in err and "prompts/s" in err
