import pytest
import yaml

from kun_dagster.config import KUN_INSTRUCTION_KEYWORDS, ConfigError, load_config, parse_config

from .conftest import REPO

MINIMAL = {"sources": [{"name": "web", "uri": "data/*.jsonl", "format": "jsonl"}], "seed": {"uri": "seed.jsonl"}}


def test_repo_config_loads_with_kun_defaults():
    cfg = load_config(REPO / "kun.yaml", env={})
    assert [s.name for s in cfg.sources] == ["wudao", "wanjuan", "skypile"]
    assert cfg.sampling.temperature == 0.5 and cfg.sampling.top_p == 0.95 and cfg.sampling.repetition_penalty == 1.2
    assert cfg.filter.max_tokens == 512 and cfg.polish.prompt_token_budget == 512 and cfg.polish.min_output_chars == 20
    assert tuple(cfg.label.banned_keywords) == KUN_INSTRUCTION_KEYWORDS
    assert cfg.resolve("demo/seed") == str(REPO / "demo" / "seed")
    assert cfg.models_dir == f"{REPO}/.kun/data/models"


def test_defaults_are_kuns():
    cfg = parse_config(MINIMAL, env={})
    assert cfg.sampling.max_tokens == 1024
    assert cfg.filter.perplexity_max == 10.0
    assert cfg.models.label.train.epochs == 6 and cfg.models.chat.train.epochs == 4
    assert cfg.models.label.train.learning_rate == 1e-5
    assert cfg.polish.banned_keywords == ["作为", "根据", "知识库", "2023", "抱歉"]
    assert cfg.score.method == "kun_choice" and cfg.score.threshold == 0.5
    assert cfg.score.min_answer_mass == 0.5 and not cfg.score.exact and cfg.polish.min_phrase_chars == 2
    assert cfg.score.decision == "mode" and cfg.tags.other == "其他"
    assert parse_config({**MINIMAL, "score": {"method": "humpback_choice"}}, env={}).score.threshold == 5  # Humpback's k
    assert cfg.checks.keep_rate == (0.2, 1.0) and "scored_pairs" not in cfg.checks.retention
    with pytest.raises(ConfigError, match="retention.scored_pairs is now checks.keep_rate"):
        parse_config({**MINIMAL, "checks": {"retention": {"scored_pairs": [0.1, 1]}}}, env={})


@pytest.mark.parametrize(
    "patch, key, words",
    [
        ({"sources": [{"name": "web", "uri": "x", "format": "csv"}]}, "sources.0.format", "'csv'"),
        ({"sources": [{"name": "Web!", "uri": "x", "format": "jsonl"}]}, "sources.0.name", "pattern"),
        ({"shards": 0}, "shards", "greater than or equal to 1"),
        ({"sampling": {"top_p": 1.5}}, "sampling.top_p", "less than or equal to 1"),
        ({"filter": {"max_tokens": 512, "max_token": 3}}, "filter.max_token", "unknown key"),
        ({"score": {"method": "kun_choice", "threshold": 3}}, "score", "outside [0.0, 1.0]"),
        ({"models": {"base": {"tiny": {"hidden_size": 64, "num_heads": 4}}}}, "models.base.tiny", "head_dim >= 32"),
        ({"sources": MINIMAL["sources"] * 2}, "(top level)", "repeated: web"),
        ({"score": {"decision": "greedy"}}, "score.decision", "'mode' or 'sampled'"),
        ({"tags": {"domains": ["通用", "医学"]}}, "tags", "tags.other '其他' must be one of tags.domains"),
    ],
)
def test_bad_config_names_key_and_reason(patch, key, words):
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, **patch}, origin="kun.yaml", env={})
    msg = str(err.value)
    assert "invalid config kun.yaml" in msg and f"  {key}:" in msg and words in msg, msg


def test_missing_required_key(tmp_path):
    (tmp_path / "kun.yaml").write_text(yaml.safe_dump({"sources": MINIMAL["sources"]}))
    with pytest.raises(ConfigError, match=r"seed: Field required"):
        load_config(tmp_path / "kun.yaml", env={})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", env={})
    (tmp_path / "bad.yaml").write_text("sources: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml", env={})


def test_env_overrides_and_relative_paths(tmp_path, monkeypatch):
    (tmp_path / "kun.yaml").write_text(yaml.safe_dump(MINIMAL))
    cfg = load_config(
        tmp_path / "kun.yaml", env={"KUN__shards": "64", "KUN__storage__base_uri": "s3://bucket/kun", "KUN__storage__models_dir": "/models"}
    )
    assert cfg.shards == 64 and cfg.base_uri == "s3://bucket/kun" and cfg.models_dir == "/models"
    assert cfg.resolve(cfg.sources[0].uri) == str(tmp_path / "data" / "*.jsonl")
    remote = load_config(tmp_path / "kun.yaml", env={"KUN__storage__base_uri": "s3://bucket/kun/"})
    assert remote.models_dir == "s3://bucket/kun/models" and remote.model_cache == str(tmp_path / ".kun" / "model-cache")
    with pytest.raises(ConfigError, match="model_cache must be a local folder"):
        _ = load_config(tmp_path / "kun.yaml", env={"KUN__storage__model_cache": "s3://bucket/cache"}).model_cache
    monkeypatch.setenv("HOME", str(tmp_path / "pod"))  # `~`: the process's home (a pod's own disk), not the config's folder
    pod = load_config(tmp_path / "kun.yaml", env={"KUN__storage__model_cache": "~/.cache/kun"})
    assert pod.model_cache == str(tmp_path / "pod/.cache/kun")


def test_a_role_keeps_its_defaults_under_partial_overrides():
    from_file = parse_config(
        {**MINIMAL, "models": {"chat": {"path": "/models/chat"}, "label": {"train": {"learning_rate": 2e-5}}}},
        env={"KUN__models__chat__vllm__tensor_parallel_size": "2"},
    )
    assert from_file.models.chat.train.epochs == 4 and from_file.models.chat.vllm.tensor_parallel_size == 2
    assert from_file.models.chat.path == "/models/chat"
    assert from_file.models.label.train.epochs == 6 and from_file.models.label.train.learning_rate == 2e-5
    only_env = parse_config(MINIMAL, env={"KUN__models__chat__train__learning_rate": "3e-5"})
    assert only_env.models.chat.train.epochs == 4 and only_env.models.chat.train.learning_rate == 3e-5
    assert parse_config({**MINIMAL, "models": {"chat": {"train": {"epochs": 2}}}}, env={}).models.chat.train.epochs == 2


def test_retention_bounds_merge_with_the_defaults_and_sources_take_an_encoding():
    cfg = parse_config({**MINIMAL, "checks": {"retention": {"raw_corpus": [0.5, 1.0]}}}, env={})
    assert cfg.checks.retention["raw_corpus"] == (0.5, 1.0) and cfg.checks.retention["instruction_dataset"] == (0.01, 1.0)
    with pytest.raises(ConfigError, match="checks.retention: unknown stage"):
        parse_config({**MINIMAL, "checks": {"retention": {"nope": [0, 1]}}}, env={})
    src = {**MINIMAL["sources"][0], "encoding": "GB18030", "text_field": "meta.content"}
    assert parse_config({**MINIMAL, "sources": [src]}, env={}).sources[0].encoding == "gb18030"
    with pytest.raises(ConfigError, match="sources.0.encoding: unknown encoding 'klingon'"):
        parse_config({**MINIMAL, "sources": [{**src, "encoding": "klingon"}]}, env={})


def test_the_resource_reads_the_config_as_it_is_now(tmp_path, monkeypatch):
    """A process that goes on after kun.yaml changed (a second `kun run` in one process, a notebook)
    gets the new config, and a KUN__ override set later too: never a stale parse."""
    import yaml

    from resources import KunResource

    from .conftest import write_config

    path = write_config(tmp_path)
    kun = KunResource(config_path=str(path))
    assert kun.config.score.threshold == 0.5 and kun.config is kun.config  # parsed once while nothing changes
    doc = yaml.safe_load(path.read_text())
    doc.setdefault("score", {})["threshold"] = 0.9
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    assert kun.config.score.threshold == 0.9
    monkeypatch.setenv("KUN__score__threshold", "0.7")
    assert kun.config.score.threshold == 0.7


def test_a_step_refuses_a_config_changed_after_its_code_location_loaded(tmp_path):
    """The definitions and their resource read one version of kun.yaml: a step that finds another
    (the file edited mid-run, or before a launch without a reload) fails saying so, rather than
    making data under a config its graph and code versions were not built from."""
    import yaml

    from kun_dagster.config import ConfigError
    from kun_dagster.definitions import build_definitions

    from .conftest import write_config

    path = write_config(tmp_path)
    kun = build_definitions(path).resources["kun"]
    assert kun.config.score.threshold == 0.5 and kun.config_version
    doc = yaml.safe_load(path.read_text())
    doc.setdefault("score", {})["threshold"] = 0.9
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    with pytest.raises(ConfigError, match="changed after this code location was loaded"):
        _ = kun.config
    assert build_definitions(path).resources["kun"].config.score.threshold == 0.9  # reloaded: the new one


def test_a_key_set_inside_a_switched_section_keeps_its_switch():
    """`kun demo --full` sets KUN__evaluation=on; a key set inside it beside (KUN__evaluation__repeats)
    used to crash the parse, and over `evaluation: on` in kun.yaml it silently turned it off."""
    from kun_dagster.config import ConfigError

    env = {"KUN__evaluation": "on", "KUN__evaluation__repeats": "2"}
    cfg = parse_config(MINIMAL, env=env)
    assert cfg.evaluation.enabled and cfg.evaluation.repeats == 2
    on = parse_config({**MINIMAL, "evaluation": "on"}, env={"KUN__evaluation__repeats": "3"})
    assert on.evaluation.enabled and on.evaluation.repeats == 3
    written = parse_config({**MINIMAL, "evaluation": {"per_source": False}}, env={"KUN__evaluation": "on"})
    assert written.evaluation.enabled and not written.evaluation.per_source
    with pytest.raises(ConfigError, match="shards is a value"):
        parse_config(MINIMAL, env={"KUN__shards": "2", "KUN__shards__x": "1"})
