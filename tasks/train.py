"""Train: meta-train one learner (algorithm, seed) on the source domains."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from prefect import task
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.logging import get_run_logger
from prefect.states import Cancelled

from adaptflow.errors import StudyError
from adaptflow.redact import redact_value
from adaptflow.settings import pool_pickup_timeout
from adaptflow.spec import Options, StudySpec, TrainSpec
from metalib import EpisodeBatch, EpisodeSampler, TrainingHistory, algorithms, backbones, meta_train
from metalib.algorithms import Algorithm
from metalib.device import resolve_device
from metalib.evaluation import Stopped
from metalib.seeding import derive_seed
from metalib.training import NonFiniteLoss
from tasks import stopping
from tasks.allocator import keep_freed_memory
from tasks.caching import stable_inputs
from tasks.checkpoints import CheckpointStore
from tasks.prepare import Pool, PreparedData
from tasks.progress import ProgressArtifact

# Seconds between looks at a flow run sent to a work pool (train_on_pool).
POLL_SECONDS = 2.0


@dataclass(frozen=True)
class LearnerSetup:
    """Everything needed to rebuild a learner: used to train it and to reload its weights."""

    algorithm: str
    label: str  # the name results carry (the algorithm's name unless the spec gives a label)
    hparams: dict[str, Any]
    backbone: str
    backbone_options: dict[str, Any]
    input_shape: tuple[int, ...]
    ways: int  # of evaluation and source-validation episodes
    train_ways: int  # of meta-training episodes
    num_classes: int

    @classmethod
    def from_spec(cls, spec: StudySpec, algorithm: Options, prepared: PreparedData) -> LearnerSetup:
        backbone = spec.backbone_for(prepared.modality)
        return cls(
            algorithm=algorithm.name,
            label=algorithm.display_name,
            hparams={"lr": spec.train.lr, **algorithm.options()},
            backbone=backbone.name,
            backbone_options=backbone.options(),
            input_shape=prepared.input_shape,
            ways=spec.episodes.ways,
            train_ways=spec.train_ways,
            num_classes=len(prepared.class_names),
        )

    def build(self) -> Algorithm:
        net = backbones.create(
            self.backbone, ways=self.ways, input_shape=self.input_shape, **self.backbone_options
        )
        return algorithms.create(
            self.algorithm, net, ways=self.ways, num_classes=self.num_classes, **self.hparams
        )

    @property
    def uses_unlabelled_target(self) -> bool:
        """Trained once per target domain, on that domain's unlabelled rows (dann)."""
        return algorithms.REGISTRY.get(self.algorithm).uses_unlabelled_target

    def check(self) -> None:
        """Builds the learner once, so bad backbone or hyperparameter options fail before training."""
        try:
            self.build()
        except (ValueError, TypeError) as exc:
            raise StudyError(f"algorithm {self.algorithm!r} on backbone {self.backbone!r}: {exc}") from None

    def resolved_hparams(self) -> dict[str, Any]:
        """Every hyperparameter, defaults included (for logging)."""
        return asdict(algorithms.make_hparams(self.algorithm, self.hparams))


@dataclass(frozen=True)
class TrainedModel:
    """A trained learner's weights (at its best source-validation step) and its curves.

    `seconds` is the training time of the execution that finished it, which trained the steps after
    `resumed_from` (0: it started from scratch; else it went on from that step's checkpoint).
    """

    state: dict[str, torch.Tensor]
    history: TrainingHistory
    seconds: float
    resumed_from: int = 0

    def load(self, setup: LearnerSetup, device: torch.device) -> Algorithm:
        learner = setup.build()
        learner.load_state_dict(self.state)
        return learner.to(device)


def source_episodes(
    setup: LearnerSetup,
    source_train: Pool,
    source_val: Pool,
    shots: int,
    queries: int,
    train: TrainSpec,
    seed: int,
) -> tuple[EpisodeSampler, EpisodeBatch]:
    """Meta-training episodes (`train_ways` classes) and the fixed source-validation batch, shaped
    like the evaluation episodes (`ways` classes) so that model selection scores what is tested."""
    sampler = EpisodeSampler(
        source_train.x, source_train.y, setup.train_ways, shots, queries, derive_seed(seed, "train")
    )
    validation = EpisodeSampler(
        source_val.x, source_val.y, setup.ways, shots, queries, derive_seed(seed, "validation")
    ).sample(train.val_episodes)
    return sampler, validation


@task(name="train", cache_policy=stable_inputs(), persist_result=True)
def train_model(
    setup: LearnerSetup,
    source_train: Pool,
    source_val: Pool,
    train: TrainSpec,
    shots: int,
    queries: int,
    seed: int,
    unlabelled_target: torch.Tensor | None = None,
) -> TrainedModel:
    """Meta-trains on source episodes; keeps the weights with the best source-validation accuracy.

    Learners that adapt without labels (dann) also get one target domain's unlabelled rows.
    Checkpoints go to the task's result storage, so a killed or retried run resumes where it stopped.
    """
    keep_freed_memory()
    logger = get_run_logger()
    device = resolve_device(train.device)
    torch.manual_seed(derive_seed(seed, "init"))
    learner = setup.build().to(device)
    if unlabelled_target is not None:
        learner.set_unlabelled_target(unlabelled_target.to(device))
    sampler, validation = source_episodes(setup, source_train, source_val, shots, queries, train, seed)
    checkpoints = CheckpointStore.of_current_task()
    resume = checkpoints.load()
    if resume is not None:
        logger.info("%s seed %d: resuming from the checkpoint at step %d", setup.label, seed, resume.step)
    progress = ProgressArtifact(train.steps, f"meta-training {setup.label}, seed {seed}, on {device}")

    def on_validate(step: int, acc: float) -> None:
        logger.info(
            "%s seed %d step %d/%d: source validation accuracy %.3f",
            setup.label,
            seed,
            step,
            train.steps,
            acc,
        )
        progress.update(step)

    started = time.perf_counter()
    try:
        history = meta_train(
            learner,
            sampler,
            steps=train.steps,
            meta_batch=train.meta_batch,
            validation=validation,
            val_every=train.val_every,
            device=device,
            on_validate=on_validate,
            checkpoint_every=train.checkpoint_every,
            checkpoint_seconds=train.checkpoint_seconds,
            on_checkpoint=checkpoints.save,
            resume=resume,
            stop=stopping.STOP_REQUESTED,
        )
    except Stopped as exc:
        return stopping.cancelled(exc)  # a State: Prefect ends the task Cancelled
    except NonFiniteLoss as exc:
        raise NonFiniteLoss(f"{exc}; lower the learning rate (the entry's lr or train.lr)") from None
    seconds = time.perf_counter() - started
    logger.info(
        "%s seed %d: kept step %d (source validation accuracy %.3f), %.1f s on %s",
        setup.label,
        seed,
        history.best_step,
        history.best_val_acc,
        seconds,
        device,
    )
    state = {
        name: value.detach().cpu() if torch.is_tensor(value) else value  # and extra state (dann's step)
        for name, value in learner.state_dict().items()
    }
    checkpoints.remove()
    return TrainedModel(state, history, seconds, resume.step if resume is not None else 0)


def check_pool_spec(spec: dict[str, Any]) -> None:
    """A training on another pool gets the spec as a flow parameter, which Prefect stores as it is:
    a spec holding a credential (a data path with a password or a signed URL) is refused, not sent."""
    if redact_value(spec) != spec:
        raise StudyError(
            "the spec holds a credential (e.g. in data.path or data_files), and training on the GPU pool "
            "would send it to Prefect as a flow parameter, stored in plain text. Leave it out of the "
            "spec and give it to the workers' environment instead (HF_TOKEN, AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY, ...), as docs/reliability.md describes."
        )


@task(name="train-on-pool", tags=["cpu"])
def train_on_pool(
    deployment: str, spec: dict[str, Any], algorithm: int, seed: int, target: str | None = None
) -> TrainedModel:
    """Runs one (algorithm, seed) of `spec` as a flow run of `deployment` (the `train` flow on another
    work pool) and returns its result, read from the result storage both hosts share.

    A run that no worker picks up within `pool_pickup_timeout()` is cancelled with an error: no
    worker of the pool is up, and the study would wait forever. A run a worker took is waited for,
    however long it trains.
    """
    check_pool_spec(spec)
    parameters = {"spec": spec, "algorithm": algorithm, "seed": seed, "target": target}
    run = run_deployment(deployment, parameters=parameters, timeout=0)
    timeout = pool_pickup_timeout()
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while run.state is None or not run.state.is_final():
            if run.state is not None and run.state.is_scheduled() and time.monotonic() > deadline:
                pool = run.work_pool_name
                waited = (
                    f"no worker picked up training run {run.name} of {deployment} from work pool {pool!r} "
                    f"within {timeout:g} s"
                )
                client.set_flow_run_state(run.id, Cancelled(message=waited))
                raise RuntimeError(  # not TimeoutError: Prefect would call it the task's own timeout
                    f"{waited} (ADAPTFLOW_POOL_PICKUP_TIMEOUT), so it was cancelled. Start a worker on a "
                    f"host with a GPU: `prefect worker start --pool {pool}`, then run the study again."
                )
            time.sleep(POLL_SECONDS)
            run = client.read_flow_run(run.id)
    if not run.state.is_completed():
        raise RuntimeError(
            f"training run {run.name} of {deployment} ended {run.state.name}; see it in the Prefect UI"
        )
    return run.state.result()
