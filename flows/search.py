"""The search step of a study: each algorithm's hyperparameters, chosen on source data only.

Runs when the spec has a `search` section, after the study run is open and before any training.
Every algorithm gets the same budget of trials; one trial per algorithm is in flight at a time, all
algorithms' trials side by side on the flow's task runner. The chosen configurations then go through
the study's normal protocol, labelled with their selection rule (e.g. 'protonet [search]').
"""

from __future__ import annotations

import optuna
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture

from adaptflow.spec import StudySpec
from tasks.prepare import PreparedData
from tasks.search import (
    Searched,
    TrialOutcome,
    ask,
    chosen,
    finished,
    folds,
    log_search_plots,
    log_trials,
    open_search,
    run_trial,
    search_key,
    search_storage,
    search_summary,
    searched_label,
    tell,
    with_params,
)
from tasks.tracking import StudyRun
from tasks.train import LearnerSetup


def search_algorithms(
    spec: StudySpec, prepared: PreparedData, setups: list[LearnerSetup], run: StudyRun
) -> tuple[list[LearnerSetup], dict[str, Searched]]:
    """Runs (or resumes) every algorithm's search to its budget and logs each trial as an MLflow run
    under `run`; returns each algorithm's chosen configuration, and the searches by its new label."""
    search = spec.search
    assert search is not None
    storage = search_storage(search, run.tracking_uri)
    keys = [search_key(spec, prepared, setup) for setup in setups]
    spaces = [spec.search_space(algorithm) for algorithm in spec.algorithms]
    studies = [open_search(search, storage, key, space) for key, space in zip(keys, spaces, strict=True)]
    trial_folds = folds(search, spec, prepared)
    for setup, study in zip(setups, studies, strict=True):
        log_trials(run, study, setup, search)  # trials finished by an earlier, killed execution
    while True:
        in_flight: list[tuple[int, optuna.Trial, PrefectFuture[TrialOutcome]]] = []
        for index, (setup, study) in enumerate(zip(setups, studies, strict=True)):
            if len(finished(study)) >= search.trials:
                continue
            trial = ask(study, spaces[index])
            unlabelled = prepared.target_unlabelled[spec.target[0]] if setup.uses_unlabelled_target else None
            future = run_trial.submit(
                search,
                storage,
                keys[index],
                trial._trial_id,
                with_params(setup, trial.params),
                trial_folds,
                spec.train,
                spec.train_shots,
                spec.episodes.queries,
                search.seed,
                unlabelled,
            )
            in_flight.append((index, trial, future))
        if not in_flight:
            break
        for index, trial, future in in_flight:
            outcome = future.result()
            tell(studies[index], trial, outcome)
            log_trials(run, studies[index], setups[index], search)
            best = max((t.value for t in finished(studies[index]) if t.value is not None), default=None)
            print(
                f"search {setups[index].label}: trial {trial.number} {outcome.state.name.lower()}"
                + (f", score {outcome.score:.3f}" if outcome.score is not None else "")
                + (f" (best {best:.3f})" if best is not None else "")
                + f", {len(finished(studies[index]))}/{search.trials} done, {outcome.seconds:.1f} s"
            )
    searches: dict[str, Searched] = {}
    chosen_setups = []
    for setup, study in zip(setups, studies, strict=True):
        found = chosen(study, search, setup.label)
        log_search_plots(run, study, setup.label)
        label = searched_label(setup.label, search)
        searches[label] = found
        chosen_setups.append(with_params(setup, found.params, label))
    summary = search_summary(searches)
    print(f"search results ({search.selection}, {search.sampler}, {search.trials} trials each):\n{summary}")
    create_markdown_artifact(
        markdown=f"## Search of {spec.name}\n\nSelection rule: {search.selection}; sampler {search.sampler}; "
        f"{search.trials} trials per algorithm; the target domains were not read.\n\n{summary}\n",
        key="search",
        description=f"hyperparameter search of study {spec.name}",
    )
    return chosen_setups, searches
