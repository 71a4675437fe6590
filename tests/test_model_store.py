"""Checkpoints on a remote store: copied once into the local cache, re-copied when they change,
uploaded whole (kun_dagster.model_store), on fsspec's in-memory store."""

import uuid

import fsspec
import pytest

from kun_dagster import model_store
from kun_dagster.store import Store


@pytest.fixture
def remote():
    root = f"memory://models-{uuid.uuid4().hex[:8]}/label"
    fs = fsspec.filesystem("memory")
    fs.pipe({f"{root}/config.json": b'{"a": 1}', f"{root}/tokenizer/vocab.json": b"{}", f"{root}/model.safetensors": b"w" * 100})
    yield root, fs
    fs.rm(root.split("/label")[0], recursive=True)


def test_a_remote_checkpoint_is_copied_once_and_recopied_when_it_changes(remote, tmp_path, monkeypatch):
    root, fs = remote
    local = model_store.local_copy(root, tmp_path, Store())
    assert (tmp_path / local).joinpath("model.safetensors").read_bytes() == b"w" * 100
    assert open(f"{local}/tokenizer/vocab.json").read() == "{}"
    gets = []
    original = type(fs).get_file
    monkeypatch.setattr(type(fs), "get_file", lambda self, *a, **k: (gets.append(a[0]), original(self, *a, **k))[1])
    assert model_store.local_copy(root, tmp_path, Store()) == local and gets == []  # unchanged: no download
    fs.pipe(f"{root}/model.safetensors", b"v" * 50)
    assert model_store.local_copy(root, tmp_path, Store()) == local and len(gets) == 3
    assert open(f"{local}/model.safetensors", "rb").read() == b"v" * 50
    assert [p.name for p in tmp_path.iterdir()] == [local.rsplit("/", 1)[1]]  # no temporary folders left


def test_local_paths_pass_through_and_a_missing_model_is_named(tmp_path):
    assert model_store.local_copy(str(tmp_path), tmp_path / "cache", Store()) == str(tmp_path)
    assert model_store.local_copy(f"file://{tmp_path}", tmp_path / "cache", Store()) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model files under memory://nothing/here"):
        model_store.local_copy("memory://nothing/here", tmp_path, Store())


def test_publish_uploads_every_file_and_reads_back(tmp_path):
    src = tmp_path / "trained"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"x" * 10)
    uri = f"memory://pub-{uuid.uuid4().hex[:8]}/chat/run1"
    assert model_store.publish(src, uri, Store()) == uri
    assert sorted(fsspec.filesystem("memory").find(uri)) == [f"/{uri[9:]}/config.json", f"/{uri[9:]}/sub/w.bin"]
    back = model_store.local_copy(uri, tmp_path / "cache", Store())
    assert open(f"{back}/sub/w.bin", "rb").read() == b"x" * 10
    assert model_store.publish(src, str(tmp_path / "x"), Store()) == str(src)  # local models_dir: already there


def test_fingerprint_follows_the_content_and_is_kept_beside_it(tmp_path):
    import os

    from kun_dagster.model_store import FINGERPRINT, MODEL_CARD, fingerprint

    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text("{}")
    (m / "model.safetensors").write_bytes(b"\x01" * 1000)
    (m / MODEL_CARD).write_text('{"seconds": 1}')
    first = fingerprint(m)
    assert (m / FINGERPRINT).is_file() and fingerprint(m) == first
    (m / MODEL_CARD).write_text('{"seconds": 2}')  # our card is not the model
    assert fingerprint(m) == first
    (m / "model.safetensors").write_bytes(b"\x02" * 1000)  # same size, other weights
    os.utime(m / "model.safetensors", ns=(1, 1))
    assert fingerprint(m) != first
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ("config.json", "model.safetensors"):
        (copy / f).write_bytes((m / f).read_bytes())
    assert fingerprint(copy) == fingerprint(m)  # content, not place or name


def test_a_given_model_without_a_checkpoint_is_refused_and_a_real_one_referenced(tmp_path):
    import pytest

    from kun_dagster.model_store import ModelError, given
    from kun_dagster.store import Store

    store = Store()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a transformers checkpoint"):
        given("chat", str(tmp_path / "empty"), store, tmp_path / "cache")
    ckpt = tmp_path / "Qwen2.5-7B"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    ref = given("chat", str(ckpt), store, tmp_path / "cache")
    assert ref["name"] == "Qwen2.5-7B" and ref["origin"] == "given" and len(ref["fingerprint"]) > 8


def test_seed_loading_names_a_bad_file_and_drops_multiple_choice(tmp_path):
    import json

    import pytest

    from kun_dagster.training import load_seeds

    good = tmp_path / "seeds.jsonl"
    good.write_text(
        "".join(
            json.dumps(r, ensure_ascii=False) + "\n"
            for r in [
                {"instruction": "什么是复利？", "output": "利滚利。"},
                {"instruction": "选择", "input": "A. 甲 B. 乙 C. 丙 D. 丁", "output": "B"},
            ]
        ),
        encoding="utf-8",
    )
    seeds, dropped = load_seeds(str(good), None, drop_multiple_choice=True)
    assert seeds["input"].tolist() == [""] and dropped == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl lacks fields \['instruction', 'output'\]"):
        load_seeds(str(bad), None, drop_multiple_choice=True)
