"""Every bad input gets one clear error naming the problem and the fix, before any training,
and leaves nothing in the MLflow store."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from adaptflow.cli import main
from adaptflow.errors import StudyError
from adaptflow.redact import redact
from adaptflow.spec import DataSpec, load_spec, registered_names
from tasks.loading import check_parquet_columns, load_domains
from tasks.prepare import PreparedData, _read_cache, _write_cache, prepare
from tasks.tracking import start_study_run, study_datasets
from tests.conftest import DEMO, OFFICE, ROOT, TINY_TRAINING, cli_overrides


def write_spec(tmp_path: Path, **changes: object) -> Path:
    spec = yaml.safe_load(DEMO.read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = spec
        for part in parents:
            node = node[part]
        node[last] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_cli(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Runs `adaptflow run`; asserts it failed cleanly and wrote no MLflow store; returns stderr."""
    db = tmp_path / "mlflow.db"
    code = main(["run", *args, "--tracking-uri", f"sqlite:///{db}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "adaptflow: error: " in err
    assert "Traceback" not in err
    assert not db.exists() and not (tmp_path / "mlruns").exists()
    return err


def test_missing_spec_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(tmp_path / "nope.yaml")], tmp_path, capsys)
    assert "nope.yaml not found" in err


def test_spec_that_is_not_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n  data: {")
    assert "is not valid YAML" in run_cli([str(path)], tmp_path, capsys)


def test_unknown_key_names_key_and_allowed_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(DEMO), "--set", "train.stepz=5"], tmp_path, capsys)
    assert "train.stepz: unknown key" in err
    assert "steps" in err and "meta_batch" in err


def test_unknown_domain_lists_the_domains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(write_spec(tmp_path, target=["webcam", "photos"]))], tmp_path, capsys)
    assert "['photos'] not found" in err
    assert "amazon" in err and "caltech" in err and "dslr" in err


def test_missing_column_lists_the_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(DEMO), "--set", "data.input=pixels"], tmp_path, capsys)
    assert "['pixels'] not in the dataset" in err
    assert "features" in err and "class_name" in err and "data.input" in err


def test_unreachable_hub_id_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(DEMO), "--set", "data.path=someone/no-such-dataset"], tmp_path, capsys)
    assert "could not be reached" in err and "local copy" in err


def test_missing_local_path_lists_its_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(DEMO), "--set", "data.path=data/office_caltech10_surff"], tmp_path, capsys)
    assert "folder 'data' exists but has no 'office_caltech10_surff'" in err
    assert "office_caltech10_surf'" in err  # the entry meant, among the folder's


def test_too_few_examples_per_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(DEMO), "--set", "episodes.queries=6"], tmp_path, capsys)
    # dslr has 8 images of class 8 and 10 of class 4; 5 shots + 6 queries need 11
    assert "target domain 'dslr'" in err
    assert "8: 8" in err and "4: 10" in err
    assert "episodes.ways, train.ways, episodes.shots or episodes.queries" in err


def test_more_ways_than_classes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(DEMO), "--set", "episodes.ways=12"], tmp_path, capsys)
    assert "ways=12 but only 10 classes are present" in err
    err = run_cli([str(DEMO), "--set", "train.ways=11"], tmp_path, capsys)
    assert "source training pool: ways=11 but only 10 classes are present" in err
    assert "training ways 11" in err and "target domain" not in err


def test_more_training_ways_for_a_ways_sized_learner(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--set", "train.ways=8", "--set", "algorithms=[{name: protonet}, {name: maml}, {name: cnp}]"]
    err = run_cli([str(DEMO), *args], tmp_path, capsys)
    assert "train.ways=8 differs from episodes.ways=5" in err
    assert "['cnp', 'maml']" in err and "protonet" in err.split("suits")[1]


def test_unknown_algorithm_and_hyperparameter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(DEMO), "--set", "algorithms=[{name: protonett}]"], tmp_path, capsys)
    assert "unknown algorithm 'protonett'" in err and "protonet" in err
    err = run_cli([str(DEMO), "--set", "algorithms=[{name: finetune, adapt_stepz: 3}]"], tmp_path, capsys)
    assert "has no hyperparameter adapt_stepz" in err and "adapt_steps" in err
    err = run_cli(
        [str(DEMO), "--set", "algorithms=[{name: protonet, distance: manhattan}]"], tmp_path, capsys
    )
    assert "distance must be 'euclidean' or 'cosine', not 'manhattan'" in err


def test_one_algorithm_twice_needs_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(DEMO), "--set", "algorithms=[{name: protonet}, {name: protonet, distance: cosine}]"],
                  tmp_path, capsys)  # fmt: skip
    assert "['protonet'] appear more than once" in err and "label" in err
    labelled = "algorithms=[{name: protonet}, {name: protonet, label: protonet_cos, distance: cosine}]"
    assert main(["validate", str(DEMO), "--set", labelled]) == 0


def test_bad_backbone_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(DEMO), "--set", "backbone.widths=[64]"], tmp_path, capsys)
    assert "on backbone 'mlp'" in err and "widths" in err


def test_source_and_target_must_differ(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(DEMO), "--set", "target=[webcam, amazon]"], tmp_path, capsys)
    assert "['amazon'] are both source and target" in err


def test_validate_command_accepts_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(DEMO)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "'dslr': 157" in out


def test_images_too_small_for_conv4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_cli([str(ROOT / "studies" / "digits.yaml"), "--set", "data.image_size=12"], tmp_path, capsys)
    assert "images must be at least 16x16, not 12x12; raise data.image_size" in err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algorithms.7.lr=0.1", "algorithms is a list of 3 item(s); address an item by its index (0..2)"),
        ("seeds.-1=4", "seeds is a list of 3 item(s)"),
        ("algorithms.first.lr=0.1", "algorithms is a list of 3 item(s)"),
        ("train.steps.max=5", "train.steps is 300, not a mapping or a list, so it has no 'max'"),
        ("train=5", "train: Input should be a valid dictionary"),
        ("train.steps=[1", "the value '[1' is not valid YAML"),
        ("train..steps=1", "expected KEY.PATH=VALUE"),
    ],
)
def test_malformed_override(
    override: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = run_cli([str(DEMO), "--set", override], tmp_path, capsys)
    assert f"--set {override!r}" in err or "is not a valid study spec" in err
    assert message in err


def test_override_after_a_scalar_replaced_its_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = run_cli([str(DEMO), "--set", "train=5", "--set", "train.steps=3"], tmp_path, capsys)
    assert "train is 5, not a mapping or a list" in err


def test_unknown_key_of_a_domain_source_lists_its_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = run_cli([str(DEMO), "--set", "data.domains={amazon: {paht: x}}"], tmp_path, capsys)
    assert "data.domains.amazon.paht: unknown key; allowed here: path, data_files" in err


def test_override_with_a_credential_is_refused_and_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "https://bob:hunter2@example.com/office.parquet?X-Amz-Signature=deadbeef"
    err = run_cli([str(DEMO), "--set", f"data.path={url}"], tmp_path, capsys)
    assert "holds a credential" in err and "Prefect would store it" in err
    assert "https://bob:***@example.com/office.parquet?X-Amz-Signature=***" in err
    assert "hunter2" not in err and "deadbeef" not in err
    assert main(["validate", str(DEMO), "--set", f"data.path={url}"]) == 2  # validate agrees with run


def per_domain_spec(tmp_path: Path) -> Path:
    """The demo's data given as one file per domain, with no top-level data.path."""
    spec = yaml.safe_load(DEMO.read_text())
    spec["data"] = {
        "domains": {
            name: {"path": "parquet", "data_files": str(OFFICE / f"{name}.parquet")}
            for name in ("amazon", "caltech", "webcam")
        },
        "log1p": True,
    }
    spec.update(
        target=["webcam"],
        algorithms=[{"name": "protonet"}],
        seeds=[0],
        episodes={"ways": 5, "shots": [1], "queries": 3, "eval_episodes": 20},
    )
    path = tmp_path / "per_domain.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_what_validate_accepts_run_runs_per_domain_paths(prefect_server: None, tmp_path: Path) -> None:
    """Domains with their own path and no data.path: validate accepts it, and run logs it (it used to
    crash in log_dataset after opening the parent run)."""
    path = per_domain_spec(tmp_path)
    assert main(["validate", str(path)]) == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", str(path), *cli_overrides(*TINY_TRAINING), "--tracking-uri", uri]) == 0
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("office-caltech-demo")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.kind = 'study'")
    assert parent.info.status == "FINISHED"
    inputs = {item.dataset.name: item for item in parent.inputs.dataset_inputs}
    assert sorted(inputs) == ["amazon", "caltech", "webcam"]
    tags = {name: {tag.key: tag.value for tag in item.tags} for name, item in inputs.items()}
    assert tags["webcam"] == {"rows": "295", "mlflow.data.context": "target"}
    assert tags["amazon"]["mlflow.data.context"] == "source"
    assert json.loads(inputs["amazon"].dataset.source)["data_files"].endswith("amazon.parquet")


def test_secrets_are_masked_in_mlflow_params_tags_inputs_and_spec(tmp_path: Path) -> None:
    """A data path with a password and a presigned signature reaches MLflow (real sqlite store) masked."""
    url = "https://bob:hunter2@example.com/office.parquet?X-Amz-Credential=AKIA1&X-Amz-Signature=deadbeef"
    spec = load_spec(DEMO, [f"data.path={url}", "data.data_files=[s3://k3y:s3cret@bucket/a.parquet]"])
    datasets = study_datasets(spec, "fingerprint", {"amazon": 1, "caltech": 1, "webcam": 1, "dslr": 1})
    run = start_study_run.fn(
        spec, f"sqlite:///{tmp_path / 'mlflow.db'}", {"origin": url}, datasets, "features"
    )
    record = run.client.get_run(run.run_id)
    spec_yaml = Path(run.client.download_artifacts(run.run_id, "spec.yaml", str(tmp_path))).read_text()
    written = json.dumps(
        [record.data.params, record.data.tags, [i.dataset.source for i in record.inputs.dataset_inputs]]
    )
    for secret in ("hunter2", "AKIA1", "deadbeef", "s3cret"):
        assert secret not in written and secret not in spec_yaml
    assert record.data.params["data.path"] == (
        "https://bob:***@example.com/office.parquet?X-Amz-Credential=***&X-Amz-Signature=***"
    )
    assert "s3://k3y:***@bucket/a.parquet" in spec_yaml


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("postgresql://mlflow:pw@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        ("https://ghp_token@github.com/o/r", "https://***@github.com/o/r"),
        ("https://h/f?token=abc&page=2#x", "https://h/f?token=***&page=2#x"),
        ("https://a.blob.core.windows.net/c/f?sv=2022&sig=abc", "https://a.blob.core.windows.net/c/f?sv=2022&sig=***"),
        ("at http://u:p@h:5000/api, sqlite:////tmp/a@b/m.db", "at http://u:***@h:5000/api, sqlite:////tmp/a@b/m.db"),
        ("s3://bucket/year=2024/key=1/x.parquet", "s3://bucket/year=2024/key=1/x.parquet"),
        ("data/office_caltech10_surf", "data/office_caltech10_surf"),
    ],
)  # fmt: skip
def test_redact(text: str, masked: str) -> None:
    assert redact(text) == masked


class WritesAFile:
    """Unpickling this would create `path`: what a malicious cache entry would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.path),))


def prepare_office(cache: Path) -> PreparedData:
    return prepare(DataSpec(path=str(OFFICE), log1p=True), ["amazon"], ["dslr"], cache=cache)


@pytest.mark.parametrize("damage", ["truncated", "code"])
def test_unreadable_cache_entry_is_recomputed_with_a_warning(damage: str, tmp_path: Path) -> None:
    """A truncated entry, or one that would run code when unpickled (refused: weights-only load),
    is prepared again, with a warning naming it, and replaced by a good entry."""
    first = prepare_office(tmp_path)
    entry = tmp_path / f"{first.fingerprint}.pt"
    marker = tmp_path / "code-ran"
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:1000])
    else:
        torch.save({"payload": WritesAFile(marker)}, entry)
    with pytest.warns(UserWarning, match=f"prepared-data cache entry {entry} is unreadable"):
        again = prepare_office(tmp_path)
    assert not marker.exists()
    assert torch.equal(again.targets["dslr"].x, first.targets["dslr"].x)
    assert torch.load(entry, weights_only=True)["fingerprint"] == first.fingerprint
    assert [path.name for path in tmp_path.iterdir()] == [entry.name]


def test_concurrent_cache_writers_each_use_their_own_temporary(tmp_path: Path) -> None:
    """Eight writers and readers of one entry at once (two runs of one spec): every read is None or a
    whole entry, nothing fails, and no temporary file is left behind."""
    prepared = prepare_office(tmp_path / "first")
    entry = tmp_path / "shared" / f"{prepared.fingerprint}.pt"
    start = threading.Barrier(8)

    def write_then_read(_: int) -> PreparedData | None:
        start.wait()
        _write_cache(entry, prepared)
        return _read_cache(entry)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a partial entry would warn "unreadable"
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(write_then_read, range(8)))
    assert all(r is not None and torch.equal(r.source_train.x, prepared.source_train.x) for r in results)
    assert [path.name for path in entry.parent.iterdir()] == [entry.name]


OPEN_STORE = """
import sys
from tasks.tracking import ensure_experiment, open_store
client = open_store(sys.argv[1])
client.create_run(ensure_experiment(client, "concurrent", sys.argv[1]))
"""


@pytest.mark.slow
def test_studies_started_together_share_a_new_sqlite_store(tmp_path: Path) -> None:
    """Three processes open one not-yet-existing sqlite store at once, as studies started together on
    a fresh machine do. Without the lock, MLflow's migrations collide ("table ... already exists")."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    children = [
        subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    errors = [child.communicate(timeout=300)[1] for child in children]
    assert [child.returncode for child in children] == [0, 0, 0], errors
    client = MlflowClient(tracking_uri=uri)
    assert len(client.search_runs([client.get_experiment_by_name("concurrent").experiment_id])) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "missing.yaml"], "spec file missing.yaml not found"),
        (["validate", str(DEMO), "--set", "train.steps=-1"], "(from --set train.steps=-1)"),
        (["run", str(DEMO), "--set", "episodes.wayz=3"], "episodes.wayz: unknown key"),
        (["validate", str(DEMO), "--set", "algorithms.0.name=mamll"], "'mamll' (did you mean 'maml'?)"),
        (["validate", str(DEMO), "--set", "backbone.name=conv5"], "unknown backbone 'conv5'"),
        (["run", str(DEMO), "--set", "data.path=data/office_caltech10_surff"], "exists but has no"),
        # local Parquet: read with pyarrow alone (tasks/loading.py:check_parquet_columns)
        (["validate", str(DEMO), "--set", "data.label=nosuch"], "['nosuch'] not in the dataset"),
        (["run", str(DEMO), "--set", "target=[webcam, photos]"], "['photos'] not found in column 'domain'"),
    ],
)
def test_spec_errors_come_before_the_heavy_imports(args: list[str], message: str) -> None:
    """A missing file, bad YAML, a mistyped key, local data path, column or domain name (of local
    Parquet data) is reported before PyTorch, Prefect, MLflow or `datasets` load (docs/benchmarks.md has
    the time from the command line: under a second)."""
    probe = (
        "import sys; from adaptflow.cli import main; code = main(sys.argv[1:]); "
        "print(sorted(m for m in ('torch', 'prefect', 'mlflow', 'datasets') if m in sys.modules)); "
        "sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and message in done.stderr
    assert done.stdout.strip() == "[]"


FLOWS = ["mlflow", "prefect"]


@pytest.mark.parametrize(
    ("override", "message", "loaded", "not_loaded"),
    [
        # the learner's typed hyperparameters need PyTorch, nothing else heavy
        ("algorithms.0.inner_lrr=0.1", "no hyperparameter inner_lrr", "torch", ["datasets", *FLOWS]),
        # columns and domain names of data only `datasets` can read (here a glob pattern): read with
        # it (tasks/loading.py), still before the flows
        ("data.label=nosuch", "['nosuch'] not in the dataset", "datasets", FLOWS),
        ("target=[webcam, photos]", "['photos'] not found in column 'domain'", "datasets", FLOWS),
    ],
)
def test_errors_before_the_flows_load_leave_the_rest_unimported(
    override: str, message: str, loaded: str, not_loaded: list[str]
) -> None:
    """Errors in a spec's values or its data files come before the flows are imported, each after
    only what it needs (docs/benchmarks.md has the times from the command line)."""
    probe = (
        "import sys; from adaptflow.cli import main; code = main(sys.argv[1:]); "
        "print(sorted(m for m in ('torch', 'scipy', 'prefect', 'mlflow', 'datasets') if m in sys.modules)); "
        "sys.exit(code)"
    )
    pattern = ["--set", "data.path=parquet", "--set", f"data.data_files={OFFICE}/*.parquet"]
    args = ["validate", str(DEMO), *(pattern if loaded == "datasets" else []), "--set", override]
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and message in done.stderr
    imported = set(ast.literal_eval(done.stdout.strip()))
    assert loaded in imported and not imported & set(not_loaded), imported


def _error(check: Callable[[], object]) -> str | None:
    try:
        check()
    except StudyError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(
    "data",
    [
        {"path": str(OFFICE)},  # a folder of Parquet files
        {"path": str(OFFICE), "data_files": ["webcam.parquet", "dslr.parquet"]},  # files in it
        {"path": "parquet", "data_files": [f"{OFFICE}/webcam.parquet", f"{OFFICE}/dslr.parquet"]},
        {"path": str(OFFICE), "domains": {"webcam": {"data_files": "webcam.parquet"}, "dslr": {}}},
    ],
)
@pytest.mark.parametrize("change", [{}, {"label": "nosuch"}, {"input": "pixels", "domain": "class_name"}])
@pytest.mark.parametrize("names", [["webcam", "dslr"], ["dslr", "photos"]])
def test_the_quick_parquet_check_says_what_loading_says(
    data: dict[str, Any], change: dict[str, str], names: list[str]
) -> None:
    """The CLI's pyarrow-only check of local Parquet data raises the error `datasets` loading raises,
    word for word, or none where loading raises none."""
    spec = DataSpec(**data, **change)
    assert _error(lambda: check_parquet_columns(spec, names)) == _error(lambda: load_domains(spec, names))


def _rows(domain: object, columns: tuple[str, ...] = ("features", "label", "domain")) -> pa.Table:
    values = {"features": [[0.0, 1.0], [1.0, 0.0]], "label": [0, 1], "domain": [domain, domain], "n": [1, 2]}
    return pa.table({column: values[column] for column in columns})


# folders `datasets` reads differently from "every Parquet file in it": the quick check must leave them
LAYOUTS: dict[str, dict[str, pa.Table | str]] = {
    "a file whose name starts with an underscore": {"a.parquet": _rows("a"), "_b.parquet": _rows("b")},
    "split-named files beside another": {
        "train.parquet": _rows("a"),
        "test.parquet": _rows("b"),
        "stats.parquet": _rows("a", ("n",)),
    },
    "a README that lists the files": {
        "README.md": "---\nconfigs:\n- config_name: default\n  data_files: data/*.parquet\n---\n",
        "data/a.parquet": _rows("a"),
        "data/b.parquet": _rows("b"),
        "stats.parquet": _rows("a", ("n",)),
    },
    "domain names stored as bytes": {"a.parquet": _rows(b"a"), "b.parquet": _rows(b"b")},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_quick_parquet_check_raises_nothing_loading_would_not(layout: str, tmp_path: Path) -> None:
    """Folder layouts whose files `datasets` selects by its own rules, and a domain column whose text
    differs from pyarrow's: the quick check leaves them to loading rather than raise a false error."""
    for name, content in LAYOUTS[layout].items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            (tmp_path / name).write_text(content)
        else:
            pq.write_table(content, tmp_path / name)
    spec = DataSpec(path=str(tmp_path))
    assert _error(lambda: load_domains(spec, ["a", "b"])) is None  # loading finds both domains
    assert _error(lambda: check_parquet_columns(spec, ["a", "b"])) is None


def test_a_damaged_parquet_file_is_named_by_the_loading_check(tmp_path: Path) -> None:
    """A file pyarrow cannot read is left by the quick check to `datasets`, whose error says what to
    look at, instead of ending in pyarrow's traceback."""
    for file in OFFICE.glob("*.parquet"):
        (tmp_path / file.name).write_bytes(file.read_bytes())
    (tmp_path / "dslr.parquet").write_bytes(b"")
    done = subprocess.run(
        [sys.executable, "-m", "adaptflow.cli", "validate", str(DEMO), "--set", f"data.path={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2 and "Is a file empty or damaged?" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_names_read_from_the_source_are_the_registered_ones() -> None:
    """The spec's torch-free name check reads the same names the registries hold once imported."""
    from metalib import algorithms, backbones

    assert registered_names("algorithms") == algorithms.names()
    assert registered_names("backbones") == backbones.REGISTRY.names()


def test_task_info_lines_stay_off_the_terminal_unless_verbose() -> None:
    """The console drops task runs' INFO lines once quietened; warnings and flow lines stay."""
    import logging

    from adaptflow.settings import quiet_task_logs

    seen: list[str] = []
    console = logging.Handler()
    console.emit = lambda record: seen.append(f"{record.name} {record.levelname}")  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addHandler(console)
    try:
        quiet_task_logs()
        for name, level in [("prefect.task_runs", logging.INFO), ("prefect.task_runs", logging.WARNING),
                            ("prefect.flow_runs", logging.INFO)]:  # fmt: skip
            root.handle(logging.LogRecord(name, level, __file__, 1, "message", None, None))
    finally:
        root.removeHandler(console)
    assert seen == ["prefect.task_runs WARNING", "prefect.flow_runs INFO"]


@pytest.mark.parametrize(
    ("home", "named"), [(None, "ADAPTFLOW_HOME is not set"), ("elsewhere", "no flows/study.py")]
)
def test_a_worker_without_the_project_folder_fails_at_its_pull_step(
    home: str | None, named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deployments' pull step, templated by Prefect as on a worker's host, stops a run that would
    start outside an adaptflow checkout, and names the variable; with it set, the run enters ROOT."""
    from prefect.utilities.templating import apply_values

    (step,) = yaml.safe_load((ROOT / "prefect.yaml").read_text())["pull"]
    ((name, inputs),) = step.items()
    module, function = name.rsplit(".", 1)
    enter = getattr(__import__(module, fromlist=[function]), function)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADAPTFLOW_HOME", raising=False)
    if home is not None:
        monkeypatch.setenv("ADAPTFLOW_HOME", str(tmp_path / home))
    with pytest.raises(StudyError, match=named) as error:
        enter(**apply_values(inputs, os.environ))  # Prefect reads `$NAME` from the environment
    assert "ADAPTFLOW_HOME" in str(error.value) and Path.cwd() == tmp_path
    monkeypatch.setenv("ADAPTFLOW_HOME", str(ROOT))
    assert enter(**apply_values(inputs, os.environ)) == {"directory": str(ROOT)}
    assert Path.cwd() == ROOT
