"""KunConfig: the typed view of kun.yaml.

Every field has the Kun method's default (reference/KUN_METHOD.md); a bad file fails at load with
the key and the reason. Environment variables `KUN__section__key=value` override the file (the
value is parsed as YAML), e.g. `KUN__storage__base_uri=s3://bucket/kun`.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .registry import RETENTION, SCORED

# Instructions that point at context the reader will not have (KUN_METHOD.md, stage 2).
KUN_INSTRUCTION_KEYWORDS = (
    "新闻",
    "材料",
    "图片",
    "链接",
    "网址",
    "根据",
    "简历",
    "简介",
    "文章",
    "摘要",
    "文本",
    "提取",
    "关键词",
    "网站",
)
# Outputs that talk about themselves, their sources or their cut-off (stage 5).
KUN_OUTPUT_KEYWORDS = ("作为", "根据", "知识库", "2023", "抱歉")
# The tag taxonomy: COIG-CQIA's task types, each minor under its major as CQIA's records group them
# (知乎问答 and 代码问答 under 问答, 文言文翻译 under 文本生成, 中学考试 under 试题, ...), and its domains
# (the demo seeds use 百科问答, 指令评价, 翻译, 选择题 and 通用). At most 26 minors and 26 domains: the chat
# model answers with an option's letter (tagging.py).
COIG_TASK_TYPES = {
    "问答": ["百科问答", "知识问答", "常识推理", "逻辑推理", "数学", "代码", "建议", "解释"],
    "文本生成": ["翻译", "文本改写", "写作", "创意写作", "观点评论", "古诗文", "文言文", "对联"],
    "摘要": ["摘要"],
    "分类": ["分类", "指令评价"],
    "信息抽取": ["信息抽取"],
    "试题": ["选择题"],
    "其他": ["其他"],
}
COIG_DOMAINS = (
    "通用",
    "医学",
    "法律",
    "金融",
    "经济",
    "教育",
    "科技",
    "计算机",
    "数学",
    "物理",
    "化学",
    "生物",
    "历史",
    "地理",
    "文学",
    "哲学",
    "心理",
    "艺术",
    "体育",
    "娱乐",
    "生活",
    "社会",
    "政治",
    "军事",
    "农业",
    "其他",
)

CONFIG_ENV = "KUN_CONFIG"
DEFAULT_CONFIG_NAME = "kun.yaml"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the key and the reason."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(_Section):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="partition key of the source")
    uri: str = Field(description="file glob; relative to the config file unless absolute or a URL")
    format: Literal["jsonl", "json", "parquet", "txt"]
    # Field names may be dotted paths into nested records (meta.content); a key that itself holds
    # a dot is found first.
    text_field: str = "text"
    id_field: str | None = Field(None, description="None: ids are '<file>:<row>'; ids are unique per source")
    title_field: str | None = None
    compression: Literal["infer", "gzip", "zstd", "none"] = "infer"
    encoding: str = Field("utf-8", description="of jsonl / json / txt files: utf-8, gb18030, utf-16, ... (Python codec names)")
    manifest: str | None = Field(
        None,
        description="the source's files read from this listing instead of the store's: an S3 Inventory manifest.json, or a "
        "JSONL/CSV/Parquet file with path (and size, etag or mtime); only the entries `uri` matches are the source's",
    )

    @field_validator("encoding")
    @classmethod
    def _known_codec(cls, name: str) -> str:
        try:
            return codecs.lookup(name).name
        except LookupError:
            raise ValueError(f"unknown encoding {name!r} (e.g. utf-8, gb18030, utf-16)") from None


class IngestConfig(_Section):
    """What one reader may hold at a time: a hostile or broken file (one 700 MB line, a gzip bomb)
    costs its own rows, as quarantine rows, never the run's memory or the rest of its file."""

    max_record_bytes: int = Field(
        16 * 2**20, ge=1024, description="a jsonl line, a txt paragraph, a Parquet record's text (UTF-8); over: record_too_large"
    )
    max_file_bytes: int = Field(
        256 * 2**20,
        ge=1024,
        description="a whole-file JSON (decompressed), a Parquet row group's columns read; over: file_too_large / row_group_too_large",
    )


class S3Settings(_Section):
    """How to reach S3 or an S3-compatible store (MinIO, Ceph, R2, ...): applies to every s3:// URI."""

    endpoint_url: str | None = Field(None, description="None: AWS itself; e.g. http://minio:9000")
    region: str | None = None
    path_style: bool = Field(False, description="bucket in the path, not the host name (MinIO and most self-hosted stores)")
    max_attempts: int = Field(10, ge=1, description="per request; connection errors, 5xx and throttling retry with exponential backoff")
    connect_timeout: float = Field(10, gt=0, description="seconds")
    # Names of the environment variables holding the credentials, read through dg.EnvVar (never a
    # value in the config). Unset variables leave boto's own chain: ~/.aws, instance or pod role.
    access_key_id_env: str = "AWS_ACCESS_KEY_ID"
    secret_access_key_env: str = "AWS_SECRET_ACCESS_KEY"
    session_token_env: str = "AWS_SESSION_TOKEN"


class StorageConfig(_Section):
    base_uri: str = Field(".kun/data", description="local folder or s3://bucket/prefix")
    models_dir: str | None = Field(None, description="checkpoints, local or s3://; None: {base_uri}/models")
    model_cache: str = Field(".kun/model-cache", description="local folder where remote checkpoints are copied for the engines")
    s3: S3Settings = S3Settings()
    storage_options: dict[str, Any] = Field(default_factory=dict, description="more fsspec options for remote URIs")
    checkpoint_rows: int = Field(2048, ge=1, description="LLM stages checkpoint a partition every this many prompts")
    batch_rows: int = Field(20000, ge=1, description="raw_corpus and filtered_corpus stream a shard this many documents at a time")


class SamplingConfig(_Section):
    temperature: float = Field(0.5, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    repetition_penalty: float = Field(1.2, gt=0)
    max_tokens: int = Field(1024, ge=1)
    seed: int = 0


class LoraSettings(_Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainSettings(_Section):
    epochs: float = Field(6, gt=0)
    learning_rate: float = Field(1e-5, gt=0)
    lr_scheduler: str = "linear"
    weight_decay: float = Field(0.1, ge=0)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(2048, ge=16)
    seed: int = 0
    lora: LoraSettings | None = None
    save_steps: int = Field(
        500, ge=0, description="optimizer steps between resumable checkpoints (0: none): a killed fine-tuning resumes from the last"
    )

    NOT_SHAPING: ClassVar[frozenset[str]] = frozenset({"save_steps"})  # how often to save changes no weight

    def shaping(self) -> dict:
        """The settings that shape the trained weights (code versions, cache and resume keys)."""
        return self.model_dump(mode="json", exclude=set(self.NOT_SHAPING))


class TinyBaseSettings(_Section):
    """The embedded default's base model: a small Qwen2 trained here on the demo texts."""

    vocab_size: int = Field(4096, ge=300)
    hidden_size: int = Field(128, ge=32)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(256, ge=8)
    max_position_embeddings: int = Field(2048, ge=128)
    pretrain_epochs: float = Field(4, ge=0)
    block_size: int = Field(64, ge=16, description="tokens per pre-training example: the texts packed end to end, no padding")
    batch_size: int = Field(8, ge=1, description="pre-training examples (blocks) per step")
    pretrain_docs: int = Field(20000, ge=0, description="corpus documents (at most) it is pre-trained on, with the seeds")
    learning_rate: float = Field(3e-3, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _head_dim(self) -> TinyBaseSettings:
        if self.hidden_size % self.num_heads or self.hidden_size // self.num_heads < 32:
            raise ValueError("hidden_size / num_heads must be a whole number >= 32 (vLLM's CPU backend needs head_dim >= 32)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.block_size > self.max_position_embeddings:
            raise ValueError("block_size must be at most max_position_embeddings")
        return self


class VLLMSettings(_Section):
    """vllm.LLM's engine arguments (the vLLM backend only); `engine_kwargs` passes any other one."""

    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    kv_cache_gib: float | None = Field(
        None, gt=0, description="KV cache size; None: gpu_memory_utilization sizes it on a GPU, 1 GiB on vLLM's CPU backend"
    )
    max_model_len: int | None = Field(None, ge=16, description="None: the model's own context length")
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=16)
    enable_prefix_caching: bool = True  # the scoring prompt's long shared head is computed once
    seed: int = 0
    # True: each request samples from its own seed, derived from `sampling.seed` and its prompt, so a
    # row's generation does not depend on its batch: a partition resumed from its checkpoints equals
    # an uninterrupted one. False: one engine-level stream seeded by `seed` (bench/README.md: the cost).
    seed_per_request: bool = True
    enforce_eager: bool = False  # True skips torch.compile/CUDA graphs: quicker start, slower decode
    quantization: str | None = None
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)


class ServerSettings(_Section):
    """The `server` backend: the role's model served by vLLM servers (`vllm serve <model>`, one per
    GPU or tensor-parallel group, or a load balancer over them), reached through their
    OpenAI-compatible API. They must serve this role's model: its tokenizer is checked at start."""

    urls: list[str] = Field(default_factory=list, description="the servers' API base URLs, e.g. http://vllm-0:8000/v1")
    model: str | None = Field(None, description="the served model's name; None: the one model each server lists")
    max_in_flight: int = Field(64, ge=1, description="requests in flight per URL (vLLM batches them)")
    timeout_s: float = Field(600.0, gt=0, description="one request's limit")
    retries: int = Field(6, ge=0, description="tries after the first on a dropped connection, a timeout, a 408/429/5xx")
    backoff_s: float = Field(1.0, gt=0, description="the first wait before a retry, doubled each time (at most 60 s)")
    api_key_env: str | None = Field(None, description="the environment variable that holds the servers' key (never the key itself)")


class EngineSettings(_Section):
    backend: Literal["auto", "vllm", "transformers", "server"] = Field(
        "auto", description="auto: vllm when it is installed; server: the `server` section's vLLM servers"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="transformers only; vLLM runs on its build's platform")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(16, ge=1, description="transformers only; vLLM schedules whole partitions itself")
    vllm: VLLMSettings = VLLMSettings()
    server: ServerSettings = ServerSettings()

    @model_validator(mode="after")
    def _servers(self) -> EngineSettings:
        if self.backend == "server" and not self.server.urls:
            raise ValueError("backend: server needs the servers' URLs (server.urls)")
        return self


class BaseModelConfig(EngineSettings):
    path: str | None = Field(None, description="local checkpoint; None builds the tiny demo base")
    tiny: TinyBaseSettings = TinyBaseSettings()


class RoleConfig(EngineSettings):
    path: str | None = Field(None, description="local checkpoint used as given; None fine-tunes the base on seed_data")
    train: TrainSettings = TrainSettings()


# Each role's own defaults where they differ from TrainSettings' (Kun: label 6 epochs, chat 4, lr
# 1e-5). They are merged under whatever the file and the environment set, key by key, so setting
# one key of a role (models.chat.path, models.chat.vllm.tensor_parallel_size) keeps the rest.
ROLE_DEFAULTS: dict[str, dict[str, Any]] = {"label": {"train": {"epochs": 6}}, "chat": {"train": {"epochs": 4}}}


class ModelsConfig(_Section):
    base: BaseModelConfig = BaseModelConfig()
    label: RoleConfig = RoleConfig.model_validate(ROLE_DEFAULTS["label"])
    chat: RoleConfig = RoleConfig.model_validate(ROLE_DEFAULTS["chat"])
    keep_default_system: bool = Field(
        False,
        description="keep a chat template's own default system message (Qwen2.5's) "
        "in prompts, training and inference alike; Kun's prompts have none",
    )

    @model_validator(mode="before")
    @classmethod
    def _role_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {
            **data,
            **{role: _merge(defaults, data[role]) for role, defaults in ROLE_DEFAULTS.items() if isinstance(data.get(role), dict)},
        }


class SeedConfig(_Section):
    uri: str = Field(description="COIG-CQIA records as JSONL (instruction, input, output, ...)")
    drop_multiple_choice: bool = True  # Kun drops seeds whose input holds all of A, B, C, D
    label_min_output_chars: int = Field(
        20,
        ge=0,
        description="the label model trains on seeds whose output has at least this many characters: it labels documents, not verdicts",
    )
    eval_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="seeds held out of every training set (a hash of the record: the same ones whatever the file's order; "
        "near-duplicate seeds together); the evaluation asset compares models on them, and the release is checked against them",
    )
    eval_min_output_chars: int = Field(
        20, ge=0, description="only answers of at least this many characters are held out: a verdict or an option letter measures nothing"
    )


class FilterConfig(_Section):
    max_tokens: int = Field(512, ge=1, description="under the label model's tokenizer")
    max_doc_chars: int = Field(
        100_000, ge=1, description="longer texts are dropped (text_too_long) before they are tokenized: bounds the tokenizer's memory"
    )
    perplexity_max: float | None = Field(10.0, gt=1, description="None disables the filter")
    perplexity_model: Literal["base", "label"] = "base"

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "dedup" in data:
            raise ValueError("filter.dedup is now dedup.exact (and dedup.near: near-duplicates across every shard)")
        return data


class DedupConfig(_Section):
    """Source-wide deduplication before any LLM stage (dedup.py): exact duplicates (the text up to
    whitespace) and near-duplicates (MinHash LSH over character n-grams of the normalised text)."""

    exact: bool = True
    near: bool = True
    ngram: int = Field(5, ge=1, le=32, description="characters per shingle (Chinese has no word boundaries)")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations: the estimate's error is about sqrt(J(1-J)/num_perm)")
    threshold: float = Field(0.8, gt=0, lt=1, description="near-duplicates: estimated Jaccard of the shingle sets at least this")
    scope: Literal["source", "all"] = Field(
        "source", description="source: within each source; all: across sources (first source listed wins)"
    )
    seed: int = 1
    mode: Literal["auto", "one_step", "banded", "band_steps"] = Field(
        "auto",
        description="how a cluster group is clustered, to the same clusters: one_step holds its signatures in one matrix "
        "(~0.9 KB a document); banded goes band by band in the clusters step, then merges (~0.26 KB a document, ~4x "
        "the CPU); band_steps makes each band a partition of lsh_band_pairs (a step of its own, wherever the executor "
        "puts it) and the clusters step merges them; auto: banded past one_step_max_docs",
    )
    one_step_max_docs: int = Field(5_000_000, ge=0, description="auto: the largest cluster group clustered in one step")


def _keywords(words: list[str]) -> list[str]:
    """An empty entry would match every text: refused, with the way to turn the filter off."""
    if any(not w.strip() for w in words):
        raise ValueError("an empty keyword would match every text; [] turns the filter off")
    return words


class LabelConfig(_Section):
    banned_keywords: list[str] = Field(default_factory=lambda: list(KUN_INSTRUCTION_KEYWORDS), description="[]: no filter")
    whitespace_run: int = Field(5, ge=2, description="cut an instruction at a run of this many whitespace characters")

    _no_empty = field_validator("banned_keywords")(_keywords)


SCORE_METHODS = ("kun_choice", "kun_freetext", "humpback_choice", "humpback_freetext")


class ScoreConfig(_Section):
    """How the chat model scores (scoring.py). *_choice read the answers' probabilities and fall back
    to generate-and-parse where the model puts little mass on them; *_freetext always generate."""

    method: Literal[SCORE_METHODS] = "kun_choice"
    threshold: float | None = Field(
        None,
        description="kept iff score >= threshold. kun_*: 0-1, P(【好】) among the two answers, or 1/0 parsed (0.5); "
        "humpback_*: the 1-5 score, most likely or parsed (5, Humpback's k)",
    )
    min_answer_mass: float = Field(
        0.5, ge=0, le=1, description="*_choice: rows whose P(reply opens with an answer) is below this are scored by free text"
    )
    exact: bool = Field(
        False,
        description="*_choice: sum every answer token (prompt logprobs) instead of the shared "
        "opening and the first differing token (one decode step each)",
    )
    decision: Literal["mode", "sampled"] = Field(
        "mode",
        description="*_choice, rows scored by probability: mode: score = P(【好】) / answer mass (humpback: the most "
        "likely digit), the threshold applied to it; sampled: the verdict of one reply drawn at sampling.temperature "
        "from the answers' probabilities, seeded per row (Kun's rule in distribution; score 1 or 0)",
    )

    @property
    def scale(self) -> tuple[float, float]:
        return (1.0, 5.0) if self.method.startswith("humpback") else (0.0, 1.0)

    @model_validator(mode="after")
    def _threshold(self) -> ScoreConfig:
        if self.threshold is None:
            object.__setattr__(self, "threshold", 5.0 if self.method.startswith("humpback") else 0.5)
        lo, hi = self.scale
        if not lo <= self.threshold <= hi:
            raise ValueError(f"threshold {self.threshold} is outside [{lo}, {hi}] for method {self.method}")
        return self


class PolishConfig(_Section):
    prompt_token_budget: int = Field(512, ge=16)
    banned_keywords: list[str] = Field(default_factory=lambda: list(KUN_OUTPUT_KEYWORDS), description="[]: no filter")
    min_output_chars: int = Field(20, ge=0)
    max_phrase_repeats: int = Field(6, ge=2, description="drop outputs that start with a phrase repeated this often")
    min_phrase_chars: int = Field(
        2,
        ge=1,
        description="a repeated phrase has at least this many characters, not all one character: ------, …… and 哈哈哈 are not phrases",
    )
    dedup_outputs: bool = True  # Humpback dedups; Kun does not

    _no_empty = field_validator("banned_keywords")(_keywords)


class _Switched(_Section):
    """A section that `name: on` / `name: off` switches (YAML reads them as booleans): {enabled: ...}."""

    enabled: bool = True

    @model_validator(mode="before")
    @classmethod
    def _switch(cls, data: Any) -> Any:
        if isinstance(data, bool):
            return {"enabled": data}
        if isinstance(data, str) and data.lower() in ("on", "off"):
            return {"enabled": data.lower() == "on"}
        return data


class TagsConfig(_Switched):
    """task_type.minor and domain of each record, chosen by the chat model from a fixed taxonomy
    (tagging.py) with the scorer's rule: the options' probabilities where the model answers with
    one, else its free-text reply parsed. `tags: off` keeps the constants (minor kun:<source>, domain 通用)."""

    task_types: dict[str, list[str]] | list[str] = Field(
        default_factory=lambda: {k: list(v) for k, v in COIG_TASK_TYPES.items()},
        description="major -> its minors, as COIG-CQIA groups them (a plain list: minors under dataset.task_major)",
    )
    domains: list[str] = Field(default_factory=lambda: list(COIG_DOMAINS), min_length=1, max_length=26)
    max_minors: int = Field(2, ge=1, le=4, description="minors a record may carry (COIG-CQIA's carry one or two)")
    minor_share: float = Field(
        0.3, gt=0, le=1, description="probability path: a further minor needs this share of the answer mass (the first needs none)"
    )
    answer_chars: int = Field(200, ge=0, description="characters of the answer shown with the instruction")
    max_tokens: int = Field(16, ge=1, description="free-text fallback: tokens of the reply parsed for an option")
    other: str = Field("其他", description="the tag of a row where neither the probabilities nor the reply name an option")

    @property
    def minors(self) -> list[str]:
        """The task-type options the model chooses from, in the order listed."""
        t = self.task_types
        return [m for ms in t.values() for m in ms] if isinstance(t, dict) else list(t)

    def majors(self, minors: list[str], default: list[str]) -> list[str]:
        """task_type.major of a record: the majors of its minors, in order, each once; `default`
        (dataset.task_major) for a minor the taxonomy does not group."""
        group = {m: major for major, ms in self.task_types.items() for m in ms} if isinstance(self.task_types, dict) else {}
        out = [x for m in minors for x in ([group[m]] if m in group else default)]
        return list(dict.fromkeys(out))

    @field_validator("domains")
    @classmethod
    def _distinct(cls, names: list[str]) -> list[str]:
        if len(set(names)) < len(names) or not all(n.strip() for n in names):
            raise ValueError("names must be distinct and non-empty")
        return names

    @model_validator(mode="after")
    def _taxonomy(self) -> TagsConfig:
        minors = self.minors
        if isinstance(self.task_types, dict) and not all(k.strip() and v for k, v in self.task_types.items()):
            raise ValueError("tags.task_types: each major needs a name and at least one minor")
        if not 1 <= len(minors) <= 26 or len(set(minors)) < len(minors) or not all(n.strip() for n in minors):
            raise ValueError("tags.task_types: 1 to 26 minors, distinct and non-empty (each is answered with a letter)")
        for key, names in (("task_types", minors), ("domains", self.domains)):
            if self.other not in names:
                raise ValueError(f"tags.other {self.other!r} must be one of tags.{key}: it is the tag where no option is named")
        return self


class JudgeConfig(_Section):
    """The evaluation's judge: a model that is none of the compared ones (a checkpoint, or a model
    behind an OpenAI-compatible endpoint, such as a hosted judge or `vllm serve`). None: no win rate."""

    path: str | None = Field(None, description="a checkpoint (local or s3://), run with models.chat's engine settings")
    endpoint: str | None = Field(None, description="an OpenAI-compatible base URL, e.g. http://judge:8000/v1")
    model: str | None = Field(None, description="the model name the endpoint serves")
    api_key_env: str = Field("KUN_JUDGE_API_KEY", description="the environment variable that holds the endpoint's key")
    timeout: float = Field(120.0, gt=0, description="seconds per request to the endpoint")

    @model_validator(mode="after")
    def _one(self) -> JudgeConfig:
        if self.path and self.endpoint:
            raise ValueError("evaluation.judge: give a path or an endpoint, not both")
        if self.endpoint and not self.model:
            raise ValueError("evaluation.judge: an endpoint needs the model name it serves (model)")
        return self

    @property
    def configured(self) -> bool:
        return bool(self.path or self.endpoint)


class BenchmarksConfig(_Section):
    """lm-evaluation-harness tasks run on the evaluation's models (benchmarks.py), from local disk."""

    tasks: list[str] = Field(default_factory=list, description="e.g. [ceval-valid, cmmlu]; empty: none")
    include_path: str | None = Field(None, description="a folder of task YAMLs in the harness's format, their data on local disk")
    num_fewshot: int | None = Field(None, ge=0, description="None: each task's own")
    limit: int | None = Field(None, ge=1, description="questions per task (None: all)")
    batch_size: int = Field(8, ge=1)
    dtype: str = "auto"


class EvaluationConfig(_Switched):
    """The evaluation asset (evaluation.py): the base fine-tuned on the seeds alone and on the seeds +
    each release, compared on the held-out seeds (seed.eval_fraction) by loss and by the chat model's
    pairwise judgement. Off by default: it trains two or more models per round."""

    enabled: bool = False
    per_source: bool = True  # also one model per source's release, beside all sources together
    max_tokens: int = Field(256, ge=1, description="of each held-out answer the models write (greedy) for the judge")
    lora: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: LoRA (models.chat.train.lora or r=16) for bases over 3B parameters"
    )
    bootstrap: int = Field(2000, ge=100, description="resamples of the held-out items for the win rate's 95% interval")
    repeats: int = Field(
        1,
        ge=1,
        le=5,
        description="fine-tunes of each model with training seeds seed, seed+1, ...: how far the loss moves with the seed alone",
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    benchmarks: BenchmarksConfig = Field(default_factory=BenchmarksConfig)
    seed: int = 0


class DatasetConfig(_Section):
    task_major: list[str] = Field(
        default_factory=lambda: ["问答"], description="task_type.major of a minor the taxonomy does not group (or tags off)"
    )
    answer_from: str = "llm"
    copyright: str = Field("暂无版权及作者信息", description="as COIG-CQIA writes it where no author is known; the card names the source")
    heldout_overlap: float | None = Field(
        0.5,
        gt=0,
        le=1,
        description="a record whose answer, or the document it was made from, holds at least this share of a held-out seed "
        "answer's character 8-grams is quarantined (heldout_overlap): a model trained on it would be measured on its own "
        "test item. null: not checked",
    )
    mixed_versions: Literal["block", "warn"] = Field(
        "block",
        description="a release over partitions made under another config or model (a single-asset materialization after a "
        "change): block fails it, naming the stale partitions; warn releases it, the card and the one_version check say so",
    )


class ChecksConfig(_Section):
    """Bounds of the statistical WARN checks (kun_dagster.quality); the schemas have none to set."""

    retention: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: dict(RETENTION),
        description="rows out / rows in per stage (polished_pairs: of the rows kept by score; instruction_dataset: records per document read)",
    )
    keep_rate: tuple[float, float] = Field(
        (0.2, 1.0), description="share of scored rows that reach score.threshold (checked on polished_pairs, which applies it)"
    )
    max_quarantine_rate: float = Field(0.1, ge=0, le=1, description="raw_corpus rows unreadable")
    max_duplicate_rate: float = Field(0.3, ge=0, le=1)
    max_empty_rate: float = Field(0.05, ge=0, le=1, description="generations that came back empty")
    max_parse_failure_rate: float = Field(0.1, ge=0, le=1, description="free-text score replies that did not parse")
    max_fallback_rate: float = Field(0.2, ge=0, le=1, description="*_choice rows scored by free text (answer mass too low)")
    max_score_shift: float = Field(0.3, ge=0, le=1, description="KS statistic against the source's published scores")
    min_overlap: float = Field(0.3, ge=0, le=1, description="share of an answer's character bigrams found in its source text")
    max_unfaithful_rate: float = Field(0.2, ge=0, le=1, description="answers under min_overlap (likely hallucinated)")

    @field_validator("retention")
    @classmethod
    def _every_stage(cls, bounds: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        if SCORED in bounds:  # scored_pairs keeps every row; the threshold is applied by polish
            raise ValueError(
                "retention.scored_pairs is now checks.keep_rate (the share kept by score.threshold, checked on polished_pairs)"
            )
        unknown = sorted(set(bounds) - set(RETENTION))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; known: {list(RETENTION)}")
        return {**RETENTION, **bounds}  # stages left out keep their default bounds


class DeployConfig(_Section):
    """Where steps run: this machine (Dagster's multiprocess executor) or one Kubernetes job per
    step (dagster-k8s' k8s_job_executor), GPU steps asking for GPUs through their tags."""

    executor: Literal["default", "k8s"] = "default"
    k8s: dict[str, Any] = Field(default_factory=dict, description="k8s_job_executor config: job_namespace, env_secrets, ...")
    owners: list[str] = Field(default_factory=lambda: ["team:kun-data"], description="every asset's owners in the UI: emails or team:name")
    automation: Literal["off", "corpus", "all"] = Field(
        "corpus",
        description="what the daemon keeps fresh by itself (Declarative Automation): corpus: the corpus group, "
        "up to deduped_corpus; all: also the models, the LLM stages and the release (GPU time); off: nothing",
    )
    observe_interval: int = Field(300, ge=1, description="seconds between observations of the source files (new, changed, removed)")

    @field_validator("owners")
    @classmethod
    def _owner_form(cls, owners: list[str]) -> list[str]:
        bad = [o for o in owners if not (o.startswith("team:") and len(o) > 5 or re.fullmatch(r"[^@\s]+@[^@\s]+", o))]
        if bad:  # Dagster refuses anything else when the definitions load; say so here with the key
            raise ValueError(f"owners must be emails or team:name (got {bad})")
        return owners


class KunConfig(_Section):
    sources: list[SourceConfig] = Field(min_length=1)
    shards: int = Field(4, ge=1, le=4096)
    storage: StorageConfig = StorageConfig()
    ingest: IngestConfig = IngestConfig()
    seed: SeedConfig
    models: ModelsConfig = ModelsConfig()
    sampling: SamplingConfig = SamplingConfig()
    filter: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    label: LabelConfig = LabelConfig()
    score: ScoreConfig = ScoreConfig()
    polish: PolishConfig = PolishConfig()
    dataset: DatasetConfig = DatasetConfig()
    tags: TagsConfig = TagsConfig()
    iterations: int = Field(
        1,
        ge=1,
        le=9,
        description="Humpback's rounds: 1 is Kun's single pass; round k >= 2 fine-tunes the base on the seeds + round k-1's "
        "release and re-scores the same labeled_pairs with it",
    )
    round_data: Literal["release", "segments"] = Field(
        "release",
        description="what round k >= 2's chat model trains on beside the seeds: release, round k-1's records (Kun's "
        "polished answers); segments, Humpback's: round k-1's pairs kept by score with the raw text as the answer, and "
        "Humpback's system tags (seeds: 'Answer in the style of an AI Assistant.', segments: 'Answer with knowledge "
        "from web search.'; the model is then prompted with the first)",
    )
    evaluation: EvaluationConfig = EvaluationConfig()
    checks: ChecksConfig = ChecksConfig()
    deploy: DeployConfig = DeployConfig()

    _root: Path = PrivateAttr(default_factory=Path.cwd)
    _origin: str = PrivateAttr(default="<memory>")

    @model_validator(mode="after")
    def _unique_sources(self) -> KunConfig:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _served_models_are_given(self) -> KunConfig:
        """vLLM servers load a checkpoint the team gives them: a role on them must name it (the
        servers' weights cannot follow a model this pipeline trains, nor round k's chat model)."""
        for role in ("base", "label", "chat"):
            m = getattr(self.models, role)
            if m.backend == "server" and not m.path:
                raise ValueError(
                    f"models.{role}: backend server runs the checkpoint the servers load, so give it as models.{role}.path "
                    "(a model this pipeline trains is not on them)"
                )
        if self.models.chat.backend == "server" and self.iterations > 1:
            raise ValueError(
                "models.chat: backend server with iterations > 1: rounds 2+ train their own chat model, which the servers do not serve"
            )
        return self

    @property
    def origin(self) -> str:
        return self._origin

    def resolve(self, uri: str) -> str:
        """A path in the config, made absolute against the config file's folder (URLs pass through;
        `~` is the running process's home: a per-pod cache under Kubernetes, where the config's own
        folder is the image's, read-only or shared)."""
        if "://" in uri:
            return uri
        path = Path(uri).expanduser()
        return str(path if path.is_absolute() else (self._root / path).resolve())

    @property
    def base_uri(self) -> str:
        return self.resolve(self.storage.base_uri).rstrip("/")

    @property
    def models_dir(self) -> str:
        """Where trained checkpoints are kept, local or remote (engines read remote ones through model_cache)."""
        path = self.resolve(self.storage.models_dir) if self.storage.models_dir else f"{self.base_uri}/models"
        return path.removeprefix("file://").rstrip("/")

    @property
    def model_cache(self) -> str:
        path = self.resolve(self.storage.model_cache)
        if "://" in path:
            raise ConfigError(f"{self._origin}: storage.model_cache must be a local folder (engines memory-map checkpoints), got {path}")
        return path

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"no source named {name!r} in {self._origin}; known: {[s.name for s in self.sources]}")

    def manifest(self, source: SourceConfig) -> str | None:
        """The source's manifest, resolved as its uri is (None: the store is listed)."""
        return self.resolve(source.manifest) if source.manifest else None

    def shard_keys(self) -> list[str]:
        return [str(i) for i in range(self.shards)]


def _section(value: Any) -> Any:
    """A switched section written as on / off (YAML reads a bool) as the mapping it stands for, so
    that a key set inside it (KUN__evaluation__repeats beside `evaluation: on`) keeps the switch."""
    if isinstance(value, str) and value.lower() in ("on", "off"):
        return {"enabled": value.lower() == "on"}
    return {"enabled": value} if isinstance(value, bool) else value


def _env_overrides(env: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in sorted(env.items()):
        if not key.startswith("KUN__"):
            continue
        parts = [p for p in key[5:].split("__") if p]
        node = out
        for i, p in enumerate(parts[:-1]):
            node[p] = _section(node.get(p, {}))
            if not isinstance(node[p], dict):
                raise ConfigError(f"{key}: {'.'.join(parts[: i + 1])} is a value, not a section with keys")
            node = node[p]
        node[parts[-1]] = yaml.safe_load(raw)  # sorted: a section's on / off comes before the keys set inside it
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(_section(merged.get(k)), dict):
            merged[k] = _merge(_section(merged[k]), v)
        elif isinstance(v, bool) and isinstance(merged.get(k), dict):
            merged[k] = {**merged[k], "enabled": v}  # on / off over a section written out in full
        else:
            merged[k] = v
    return merged


def _describe(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        got = f" (got {e['input']!r})" if e["type"] not in ("missing", "extra_forbidden") and not isinstance(e["input"], dict) else ""
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}{got}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], root: Path | str = ".", origin: str = "<memory>", env: dict[str, str] | None = None) -> KunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {origin}: the top level must be a mapping, got {type(data).__name__}")
    data = _merge(data, _env_overrides(dict(os.environ) if env is None else env))
    try:
        cfg = KunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, origin)) from None
    cfg._root = Path(root).resolve()
    cfg._origin = origin
    return cfg


def config_path(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_NAME).resolve()


def fingerprint(path: str | os.PathLike) -> str:
    """Which version of kun.yaml and of its KUN__ overrides a process would read: a hash of both
    (the file's bytes, a few KB: exact where mtimes are coarse)."""
    digest = hashlib.sha256()
    try:
        digest.update(Path(path).read_bytes())
    except OSError:
        pass  # load_config says what is wrong with it
    digest.update(repr(sorted((k, v) for k, v in os.environ.items() if k.startswith("KUN__"))).encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def _parsed(path: str, version: str) -> KunConfig:
    return load_config(path)


def read_config(path: str | os.PathLike | None = None) -> KunConfig:
    """kun.yaml as load_config reads it, parsed once per process for each version of the file and
    its overrides (fingerprint): the definitions and every step read the same parse."""
    p = str(config_path(path))
    return _parsed(p, fingerprint(p))


def load_config(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> KunConfig:
    """Read kun.yaml (or $KUN_CONFIG); relative paths inside it resolve against its folder."""
    p = config_path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (pass a path or set ${CONFIG_ENV})")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid config {p}: not valid YAML: {err}") from None
    return parse_config(data, root=p.parent, origin=str(p), env=env)
