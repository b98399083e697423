"""The data pipeline: corpus split, packing, document boundaries, row sharding, resume, tasks."""

from __future__ import annotations

import os

import numpy as np
import pytest

from train import data, tasks
from train.config import DataConfig


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return DataConfig(max_files=24, max_file_bytes=2048,
                      data_dir=str(tmp_path_factory.mktemp("tfds")))


@pytest.fixture(scope="module")
def corpus(cfg):
    return data.Corpus.load(cfg)


def take(it, n):
    return [next(it) for _ in range(n)]


def equal_batches(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_corpus_is_the_stdlib_split_by_file(cfg, corpus):
    files = data.corpus_files(cfg)
    assert len(files) == 24 and all(rel.endswith(".py") for rel, _ in files)
    train, val = data.split_files(files, cfg.validation_fraction)
    assert len(corpus.train) == len(train) and len(corpus.validation) == len(val) >= 1
    train_paths = {corpus.train[i]["path"] for i in range(len(corpus.train))}
    val_paths = {corpus.validation[i]["path"] for i in range(len(corpus.validation))}
    assert not train_paths & val_paths
    assert all(corpus.train[i]["bytes"].size <= 2048 for i in range(len(corpus.train)))


def test_batches_are_deterministic_and_seeded(cfg, corpus):
    mk = lambda seed: data.make_batches(corpus.train, cfg, rows=range(4), num_rows=4,  # noqa: E731
                                        seq_len=64, seed=seed)
    a, b, c = take(mk(0), 5), take(mk(0), 5), take(mk(1), 5)
    assert equal_batches(a, b)
    assert not equal_batches(a, c)


def test_packing_keeps_documents_apart(cfg, corpus):
    it = data.make_batches(corpus.train, cfg, rows=range(2), num_rows=2, seq_len=4096, seed=0)
    batch = take(it, 2)[-1]
    seq, seg, pos = (batch[k] for k in data.KEYS)
    assert seq.shape == seg.shape == pos.shape == (2, 4097)
    for r in range(2):
        starts = np.flatnonzero(np.diff(seg[r]) != 0) + 1
        assert len(starts) >= 1  # documents of at most 2 KB: several per row
        for s in starts:  # a new document: positions restart, and it opens with BOS
            assert pos[r, s] == 0 and seq[r, s] == data.BOS and seq[r, s - 1] == data.EOS
        inner = np.flatnonzero(np.diff(seg[r]) == 0) + 1
        assert np.all(pos[r, inner] == pos[r, inner - 1] + 1)
    m = data.model_inputs(batch)
    assert m["tokens"].shape == (2, 4096)
    np.testing.assert_array_equal(m["targets"], seq[:, 1:])
    # no loss on a target that starts another document
    cross = seg[:, 1:] != seg[:, :-1]
    assert cross.any() and np.all(m["weights"][cross] == 0) and np.all(m["weights"][~cross] == 1)


def test_rows_read_by_separate_processes_match_one_process(cfg, corpus):
    whole = take(data.make_batches(corpus.train, cfg, rows=range(4), num_rows=4, seq_len=64,
                                   seed=0), 4)
    lo = take(data.make_batches(corpus.train, cfg, rows=[0, 1], num_rows=4, seq_len=64,
                                seed=0), 4)
    hi = take(data.make_batches(corpus.train, cfg, rows=[2, 3], num_rows=4, seq_len=64,
                                seed=0), 4)
    joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(lo, hi, strict=True)]
    assert equal_batches(whole, joined)


def test_iterator_state_resumes_exactly(cfg, corpus):
    it = data.make_batches(corpus.train, cfg, rows=range(3), num_rows=3, seq_len=128, seed=0)
    take(it, 7)  # past the first epoch of some rows (24 short files)
    state = it.get_state()
    expected = take(it, 6)
    fresh = data.make_batches(corpus.train, cfg, rows=range(3), num_rows=3, seq_len=128, seed=0)
    fresh.set_state(state)
    assert equal_batches(take(fresh, 6), expected)
    other = data.make_batches(corpus.train, cfg, rows=[0, 1], num_rows=3, seq_len=128, seed=0)
    with pytest.raises(ValueError, match="rows"):
        other.set_state(state)


def test_task_mixing_is_deterministic_and_resumable(cfg, corpus):
    mixed = DataConfig(max_files=24, max_file_bytes=2048, data_dir=cfg.data_dir,
                       tasks=("copy", "mqar"), task_fraction=0.5)
    mk = lambda: data.make_batches(corpus.train, mixed, rows=range(2), num_rows=2,  # noqa: E731
                                   seq_len=256, seed=0)
    a = take(mk(), 8)
    assert equal_batches(a, take(mk(), 8))
    kinds = []
    for b in a:
        row_kinds = []
        for r in range(2):
            full = data.decode(b["inputs"][r])
            head = full[:40]
            row_kinds.append("mqar" if ("=" in head and ";" in head) else
                             "copy" if full.count("|") == 1 and head.isalpha() else "text")
        kinds.append(row_kinds)
    flat = [k for ks in kinds for k in ks]
    assert {"copy", "mqar", "text"} <= set(flat)
    assert any(ks[0] != ks[1] for ks in kinds)  # rows draw independently within a step
    it = mk()
    take(it, 3)
    state = it.get_state()
    rest = take(it, 4)
    again = mk()
    again.set_state(state)
    assert equal_batches(take(again, 4), rest)


@pytest.mark.parametrize("task", sorted(tasks.GENERATORS))
def test_task_answers_are_where_the_mask_says(task):
    seq_len = 512
    b = tasks.batch(task, num=3, seq_len=seq_len, seed=0)
    assert b["tokens"].shape == (3, seq_len + 1) and b["tokens"][0, 0] == data.BOS
    for tokens, mask in zip(b["tokens"], b["answer_mask"], strict=True):
        answer = data.decode(tokens[mask])
        text = data.decode(tokens[~mask])
        assert mask.sum() > 0
        if task == "passkey":
            assert len(answer) == 5 and answer.isdigit()
            assert f"The pass key is {answer}." in text
        elif task == "copy":
            assert text.split("|")[0] == answer
        else:  # mqar: every queried value was stated with its key up front
            pairs = dict(p.split("=") for p in text.split(";")[:-1])
            queries = text.split(";")[-1].split()[-8:]
            got = [answer[3 * i: 3 * i + 3] for i in range(len(queries))]
            assert [pairs[q.rstrip("=")] for q in queries] == got
    with pytest.raises(ValueError, match="passkey needs at least"):
        tasks.batch("passkey", num=1, seq_len=64, seed=0)


def test_unigram_baseline_is_a_byte_entropy(corpus):
    h = data.unigram_entropy(corpus.train)
    assert 2.5 < h < np.log(256)


def test_a_glob_or_directory_of_text_files_is_a_corpus(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    texts = {f"sub/note{i}.txt" if i % 2 else f"note{i}.txt": f"note number {i}\n" * (i + 1)
             for i in range(6)}
    for rel, text in texts.items():
        (docs / rel).write_text(text)
    (docs / "skip.md").write_text("not a .txt file")
    for corpus in (str(docs / "**" / "*.txt"), str(docs)):
        cfg = DataConfig(corpus=corpus, suffixes=(".txt",), validation_fraction=0.2,
                         data_dir=str(tmp_path / "tfds"))
        c = data.Corpus.load(cfg)
        got = {}
        for src in (c.train, c.validation):
            for i in range(len(src)):
                got[src[i]["path"].decode()] = bytes(src[i]["bytes"]).decode()
        assert {os.path.basename(p) for p in got} == {os.path.basename(p) for p in texts}
        assert sorted(got.values()) == sorted(texts.values())
    with pytest.raises(ValueError, match="matches no file"):
        data.corpus_files(DataConfig(corpus=str(tmp_path / "none" / "*.txt")))
