"""The `study` flow: prepare -> train each (algorithm, seed) -> evaluate each target x shots -> report.

Tasks cache on their inputs, so rerunning a spec reuses prepared data, trained models and
evaluations that finished before; every execution still gets its own complete MLflow parent run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from adaptflow.settings import default_tracking_uri
from adaptflow.spec import StudySpec, load_spec
from metalib.seeding import derive_seed
from tasks.evaluate import evaluate_model
from tasks.prepare import PreparedData, check_episode_shapes, prepare, prepare_data
from tasks.report import Result, log_evaluation, report_study
from tasks.tracking import StudyRun, log_dataset, start_study_run
from tasks.train import LearnerSetup, train_model


def validate_study(spec: StudySpec) -> PreparedData:
    """Every check a study run makes before training, without Prefect or MLflow."""
    prepared = prepare(spec.data, spec.source, spec.target)
    check_episode_shapes(spec, prepared)
    for algorithm in spec.algorithms:
        LearnerSetup.from_spec(spec, algorithm, prepared).build()
    return prepared


@flow(name="study", log_prints=True)
def study(
    spec: str | dict[str, Any] = "studies/demo.yaml",
    overrides: list[str] | None = None,
    tracking_uri: str | None = None,
) -> list[dict[str, Any]]:
    """Runs one study spec (a YAML path or an inline mapping); returns the summary table rows."""
    study_spec = load_spec(spec, overrides or [])
    prepared = prepare_data(study_spec.data, study_spec.source, study_spec.target)
    check_episode_shapes(study_spec, prepared)
    setups = [LearnerSetup.from_spec(study_spec, a, prepared) for a in study_spec.algorithms]
    for setup in setups:
        setup.build()  # bad backbone or hyperparameter options fail here, before MLflow is touched
    flow_run_id = str(flow_run.id)
    run = start_study_run(
        study_spec, tracking_uri or default_tracking_uri(), {"prefect_flow_run_id": flow_run_id}
    )
    log_dataset(run, study_spec, prepared.fingerprint, sum(prepared.rows_per_domain.values()))
    try:
        results = [
            result
            for setup in setups
            for seed in study_spec.seeds
            for result in _train_and_evaluate(study_spec, prepared, setup, seed, run, flow_run_id)
        ]
        summary = report_study(run, study_spec, results)
    except BaseException:
        run.client.set_terminated(run.run_id, "FAILED")
        raise
    run.client.set_terminated(run.run_id, "FINISHED")
    return summary.to_dict(orient="records")


def _train_and_evaluate(
    spec: StudySpec, prepared: PreparedData, setup: LearnerSetup, seed: int, run: StudyRun, flow_run_id: str
) -> list[Result]:
    trained_state = train_model(
        setup,
        prepared.source_train,
        prepared.source_val,
        spec.train,
        shots=spec.train_shots,
        queries=spec.episodes.queries,
        seed=seed,
        return_state=True,
    )
    trained = trained_state.result()
    results = []
    for target in spec.target:
        for shots in spec.episodes.shots:
            state = evaluate_model(
                setup,
                trained,
                prepared.targets[target],
                shots=shots,
                queries=spec.episodes.queries,
                episodes=spec.episodes.eval_episodes,
                episode_seed=derive_seed(seed, "evaluation", target, shots),
                device=spec.train.device,
                return_state=True,
            )
            results.append(
                log_evaluation(
                    run,
                    spec,
                    setup,
                    trained,
                    state.result(),
                    seed=seed,
                    target=target,
                    shots=shots,
                    flow_run_id=flow_run_id,
                    cached=state.name == "Cached",
                )
            )
    return results
