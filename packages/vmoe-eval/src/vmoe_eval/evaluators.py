"""Evaluators as plugins: accuracy (precision@1) and few-shot linear transfer, and the trainer
callback that runs them on each evaluated checkpoint.

    run = loading.load_run("runs/digits")
    get_evaluator("accuracy").evaluate(run)        # {"validation/accuracy": ..., "test/...": ...}
    get_evaluator("fewshot", shots=(5,)).evaluate(run)   # {"fewshot/5shot/mean": ..., ...}

An evaluator is any object with a `name` and `evaluate(run: LoadedRun) -> dict[str, float]`
(flat results, "/"-separated keys). Evaluators are plugins: the hook `vmoe_evaluators()`
(vmoe_eval.hookspecs) maps names to factories `factory(**options) -> Evaluator`; the built-ins
"accuracy" and "fewshot" come through the same hook. `get_evaluator(name, **options)` builds
one (unknown names and options are errors listing what is installed / allowed),
`available_evaluators()` lists every installed name.

Every evaluator sees every example of a split exactly once, whatever the batch size and the
number of processes: it iterates with `loading.forward` (ordered, padded eval batches, global
on every process) and weighs by the batch's mask. With several processes every process
computes the same results.

The trainer's periodic evaluation runs them too: the callback "evaluators" (`EvalCallback`,
registered through vmoe-train's hook `vmoe_train_callbacks`; the trainer uses it whenever
`config.eval.evaluators` names evaluators) evaluates the parameters the trainer holds at its
evaluation steps (and the final one, through the hook `on_evaluate`: no checkpoint is read) with
the evaluators named in `config.eval.evaluators`, writes `workdir/eval/<step>.json` and prints
one line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

import vmoe_data
import vmoe_layers as vl
import vmoe_plugins
from vmoe_eval import fewshot, loading
from vmoe_eval.loading import LoadedRun
from vmoe_train import setup as setup_lib
from vmoe_train.callbacks import Callback, RunInfo
from vmoe_train.config import config_get
from vmoe_train.losses import top1_correct

__all__ = [
    "EVALUATORS",
    "Accuracy",
    "EvalCallback",
    "Evaluator",
    "FewShot",
    "available_evaluators",
    "extract_features",
    "get_evaluator",
    "make_evaluators",
    "register",
]


@runtime_checkable
class Evaluator(Protocol):
    """What an evaluator plugin returns: a name and `evaluate(run) -> {"a/b": float}`."""

    name: str

    def evaluate(self, run: LoadedRun) -> dict[str, float]: ...


EVALUATOR_MEMBERS = ("name", "evaluate")

EVALUATORS: vmoe_plugins.Registry[Evaluator] = vmoe_plugins.Registry(
    "vmoe_evaluators", "evaluator", members=EVALUATOR_MEMBERS
)


def register() -> None:
    """Adds the `vmoe_evaluators` hook and the built-ins (the "accuracy" and "fewshot"
    evaluators, the trainer callback "evaluators") to the plugin host.

    Idempotent; runs at the import of this module (and may be called again from `vmoe_eval`).
    """
    from vmoe_eval import _builtins, hookspecs

    vmoe_plugins.add_hookspecs(hookspecs)
    vmoe_plugins.register_builtin("vmoe_eval.builtins", _builtins)


def available_evaluators() -> list[str]:
    """Names of every installed evaluator (built-ins and plugins), sorted."""
    return EVALUATORS.names()


def get_evaluator(name: str, /, **options: Any) -> Evaluator:
    """The evaluator registered as `name`, built with `options`.

    An unknown name is a ValueError listing the installed ones (with the closest match); an
    unknown option one listing the allowed ones; a bad option value one naming the option.
    """
    return EVALUATORS.create(name, **options)


EvaluatorSpec = str | tuple[str, Mapping[str, Any]] | Mapping[str, Any] | Evaluator


def make_evaluators(specs: Iterable[EvaluatorSpec]) -> list[Evaluator]:
    """Evaluators from specs: a name, a (name, {options}) pair, a mapping {"name": ..., **options}
    or an evaluator object (e.g. from `config.eval.evaluators`). All are built before any runs,
    so a bad name or option fails at once."""
    if isinstance(specs, str):
        raise ValueError(
            f"evaluators must be a tuple of specs, not the string {specs!r}; e.g. ({specs!r},)"
        )
    built = []
    for spec in specs:
        if isinstance(spec, str):
            built.append(get_evaluator(spec))
        elif isinstance(spec, Mapping):
            options = dict(spec)
            name = options.pop("name", None)
            if not isinstance(name, str):
                raise ValueError(f"evaluator spec {spec!r} has no 'name'")
            built.append(get_evaluator(name, **options))
        elif isinstance(spec, tuple | list) and len(spec) == 2 and isinstance(spec[0], str):
            if not isinstance(spec[1], Mapping):
                raise ValueError(f"evaluator spec {spec!r}: options must be a mapping")
            built.append(get_evaluator(spec[0], **dict(spec[1])))
        else:
            EVALUATORS.check_members(spec, f"evaluator spec {spec!r}")
            built.append(spec)
    return built


# ---------------------------------------------------------------------------------------------
# Options and helpers shared by the built-ins.


def _routing_options(
    where: str, batch_size: Any, k: Any, capacity_factor: Any, router: Any
) -> tuple[int | None, int | None, float | None, str | None]:
    if batch_size is not None:
        batch_size = vmoe_plugins.check_int("batch_size", batch_size, 1, where=where)
    if k is not None:
        k = vmoe_plugins.check_int("k", k, 1, where=where)
    if capacity_factor is not None:
        capacity_factor = float(
            vmoe_plugins.check_number("capacity_factor", capacity_factor, above=0, where=where)
        )
    if router is not None:
        router = vmoe_plugins.check_str("router", router, where=where)
    return batch_size, k, capacity_factor, router


def _split_names(where: str, name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else tuple(value)
    for split in names:
        vmoe_plugins.check_str(name, split, where=where)
    if not names:
        raise ValueError(f"{where}{name}={value!r} must name at least one split")
    return names


def _eval_capacity(run: LoadedRun, capacity_factor: float | None) -> float | None:
    """The evaluation capacity factor: the given one, else the config's `eval.capacity_factor`
    (0 = the routers' own), as the trainer's `evaluate` uses (`setup.eval_capacity_factor`)."""
    if capacity_factor is not None:
        return capacity_factor
    return setup_lib.eval_capacity_factor(run.config)


def _batch_size(run: LoadedRun, batch_size: int | None, model: Any) -> int:
    """The global eval batch size, checked against the model's routing groups."""
    size = int(batch_size or run.config.eval_batch_size)
    moe = getattr(model, "moe", None)
    group = getattr(moe, "group_size", None)
    if group:
        tokens = setup_lib.tokens_per_image(model, tuple(run.setup.sample_images.shape[1:]))
        if (size * tokens) % group:
            images = group / tokens
            raise ValueError(
                f"batch_size={size}: the model routes groups of {group} tokens "
                f"({images:g} images of {tokens} tokens), which must divide the batch's "
                f"{size * tokens} tokens; use a batch size that is a multiple of {images:g}"
            )
    return size


def _model(run: LoadedRun, router: str | None) -> Any:
    return loading.with_routing(run.model, router) if router else run.model


def extract_features(
    run: LoadedRun,
    split: str,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    batch_size: int | None = None,
    k: int | None = None,
    capacity_factor: float | None = None,
    router: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(pre-logit features float32 [N, D], labels int [N]) of `split` (or of its examples
    `indices`, in that order), every example once, with frozen parameters.

    `k`, `capacity_factor` and `router` change the routing for this pass only (default: as the
    trainer evaluates, see `Accuracy`); `batch_size` defaults to the config's eval batch size.
    """
    model = _model(run, router)
    size = _batch_size(run, batch_size, model)
    capacity = _eval_capacity(run, capacity_factor)
    if indices is not None:
        indices = np.asarray(indices, np.int64)
        dataset, base = run.dataset, run.dataset.source(split)
        subset = vmoe_data.Dataset(
            f"{dataset.name}:{split}[{len(indices)} examples]",
            dataset.num_classes,
            {"subset": len(indices)},
            lambda _, base=base, indices=indices: vmoe_data.IndexedSource(base, indices),
            class_names=dataset.class_names,
        )
        run = dataclasses.replace(run, setup=dataclasses.replace(run.setup, dataset=subset))
        split = "subset"

    pre_logits = _jitted_output(model, k, capacity, "pre_logits")
    features, labels = [], []
    for out, batch in loading.forward(run, split, batch_size=size, apply_fn=pre_logits):
        mask = np.asarray(batch["mask"], bool)
        features.append(np.asarray(loading.to_host(out), np.float32)[mask])
        labels.append(np.asarray(batch["label"])[mask])
    return np.concatenate(features), np.concatenate(labels).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# accuracy


@functools.lru_cache(maxsize=32)
def _jitted_output(model: Any, k: int | None, capacity: float | None, output: str) -> Any:
    """The jitted forward of `model` at (k, capacity) returning `output` ("top1": the argmax of
    the logits; or a ModelOutput field): one compilation per distinct setting, kept across
    `evaluate` calls (the trainer's callback evaluates the same model again and again)."""

    @jax.jit
    def forward(variables, images):
        out = model.apply(variables, images, k=k, capacity_factor=capacity)
        return jnp.argmax(out.logits, axis=-1) if output == "top1" else getattr(out, output)

    return forward


class Accuracy:
    """Precision@1: the fraction of examples whose top-1 class is a true label.

    Counted by `vmoe_train.losses.top1_correct`, the trainer's own definition: the argmax of the
    logits (also of sigmoid models: sigmoid is monotonic) is the label (`batch["label"]`), or
    among the labels of the multi-hot `batch["labels"]` when the eval preprocessing makes one
    ([B, C], e.g. `onehot(C)` or a multi-label op). Padded examples (mask False) are never
    counted; with the config's defaults the number is exactly the trainer's `evaluate`.

    Options:
      split: a split or several; default: the config's `dataset.eval_splits` and
        `dataset.test_split` (what the trainer's final evaluation reports).
      batch_size: global eval batch size (default: the config's `eval_batch_size`); any size
        the processes and the model's routing groups divide; padding is masked.
      k: experts per token at inference (default: the router's).
      capacity_factor: at inference (default: the config's `eval.capacity_factor`, 0 there
        meaning the router's own, as the trainer evaluates).
      router: another router for the same parameters (e.g. "bpr" for vanilla-trained ones).

    Results: "<split>/accuracy" and "<split>/examples" (the count of real examples).
    """

    name = "accuracy"

    def __init__(
        self,
        split: str | Sequence[str] | None = None,
        batch_size: int | None = None,
        k: int | None = None,
        capacity_factor: float | None = None,
        router: str | None = None,
    ) -> None:
        where = "accuracy: "
        self.splits = _split_names(where, "split", split)
        self.batch_size, self.k, self.capacity_factor, self.router = _routing_options(
            where, batch_size, k, capacity_factor, router
        )

    def splits_of(self, run: LoadedRun) -> tuple[str, ...]:
        if self.splits is not None:
            return self.splits
        names = list(config_get(run.config, "dataset.eval_splits", ()) or ())
        test = config_get(run.config, "dataset.test_split", "")
        names += [test] if test else []
        return tuple(dict.fromkeys(names)) or ("test",)

    def evaluate(self, run: LoadedRun) -> dict[str, float]:
        model = _model(run, self.router)
        size = _batch_size(run, self.batch_size, model)
        k, capacity = self.k, _eval_capacity(run, self.capacity_factor)

        top1 = _jitted_output(model, k, capacity, "top1")
        results: dict[str, float] = {}
        for split in self.splits_of(run):
            correct = count = 0
            for predicted, batch in loading.forward(run, split, batch_size=size, apply_fn=top1):
                predicted = np.asarray(loading.to_host(predicted))
                mask = np.asarray(batch["mask"], bool)
                correct += int(np.sum(top1_correct(predicted, batch) & mask))
                count += int(np.sum(mask))
            results[f"{split}/accuracy"] = correct / max(count, 1)
            results[f"{split}/examples"] = float(count)
        return results


# ---------------------------------------------------------------------------------------------
# fewshot


class FewShot:
    """Few-shot linear transfer on frozen pre-logit features (`vmoe_eval.fewshot`).

    For every number of shots n and seed s: the n-per-class examples of the training split that
    `vmoe_data.few_shot_indices(labels, n, s)` draws (the ones `few_shot_pipeline` serves) fit
    the closed-form least-squares classifier, which is scored on every example of the test
    split. The L2 strength is chosen per (n, s) on training data only (`fewshot.choose_l2`):
    by cross-validation over the n shots when n >= 2; for n = 1, where there is nothing to hold
    out, on `holdout_shots` further examples per class of the training split, disjoint from
    the shot (drawn with the seed s), which are used for that choice only, never fitted on.

    Options:
      shots: numbers of examples per class (default 1, 5, 10, 25); each must be at most the
        smallest class of the training split.
      seeds: draws per number of shots (default 0, 1, 2); results are their mean and spread.
      train_split: where shots come from (default: the config's `dataset.train_split`).
      test_split: where accuracy is measured (default: the config's `dataset.test_split`,
        else "test").
      l2_grid: L2 strengths to choose from (default 2^-10 .. 2^19).
      l2: a fixed L2 strength instead of choosing one.
      folds: cross-validation folds for n >= 2 (at most n are used).
      holdout_shots: held-out examples per class for choosing L2 at n = 1.
      batch_size, k, capacity_factor, router: the forward pass, as `Accuracy`'s.

    Results, per n: "fewshot/<n>shot/mean" and "/std" (accuracy over seeds; std with ddof=0),
    "/l2" (the median chosen L2).
    """

    name = "fewshot"

    def __init__(
        self,
        shots: int | Sequence[int] = (1, 5, 10, 25),
        seeds: int | Sequence[int] = (0, 1, 2),
        train_split: str | None = None,
        test_split: str | None = None,
        l2_grid: Sequence[float] = fewshot.DEFAULT_L2_GRID,
        l2: float | None = None,
        folds: int = 5,
        holdout_shots: int = 5,
        batch_size: int | None = None,
        k: int | None = None,
        capacity_factor: float | None = None,
        router: str | None = None,
    ) -> None:
        where = "fewshot: "
        shots = (shots,) if vmoe_plugins.is_int(shots) else tuple(shots)
        seeds = (seeds,) if vmoe_plugins.is_int(seeds) else tuple(seeds)
        if not shots or not seeds:
            raise ValueError(f"{where}shots={shots!r} and seeds={seeds!r} must not be empty")
        self.shots = tuple(
            sorted({vmoe_plugins.check_int("shots", n, 1, where=where) for n in shots})
        )
        self.seeds = tuple(
            dict.fromkeys(vmoe_plugins.check_int("seeds", s, 0, where=where) for s in seeds)
        )
        self.train_split = (
            None
            if train_split is None
            else vmoe_plugins.check_str("train_split", train_split, where=where)
        )
        self.test_split = (
            None
            if test_split is None
            else vmoe_plugins.check_str("test_split", test_split, where=where)
        )
        grid = tuple(l2_grid) if not vmoe_plugins.is_number(l2_grid) else (l2_grid,)
        if not grid:
            raise ValueError(f"{where}l2_grid must hold at least one value")
        self.l2_grid = tuple(
            float(vmoe_plugins.check_number("l2_grid", v, above=0, where=where)) for v in grid
        )
        self.l2 = (
            None if l2 is None else float(vmoe_plugins.check_number("l2", l2, above=0, where=where))
        )
        self.folds = vmoe_plugins.check_int("folds", folds, 2, where=where)
        self.holdout_shots = vmoe_plugins.check_int("holdout_shots", holdout_shots, 1, where=where)
        self.batch_size, self.k, self.capacity_factor, self.router = _routing_options(
            where, batch_size, k, capacity_factor, router
        )

    def _forward_options(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "k": self.k,
            "capacity_factor": self.capacity_factor,
            "router": self.router,
        }

    def evaluate(self, run: LoadedRun) -> dict[str, float]:
        dataset = run.dataset
        num_classes = dataset.num_classes
        train_split = self.train_split or config_get(run.config, "dataset.train_split", "train")
        test_split = self.test_split or config_get(run.config, "dataset.test_split", "") or "test"
        labels = np.asarray(dataset.labels(train_split), np.int64)
        check_shots(labels, num_classes, max(self.shots), train_split, dataset)

        draws: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = {}
        for n in self.shots:
            for seed in self.seeds:
                chosen = vmoe_data.few_shot_indices(labels, n, seed, num_classes=num_classes)
                held = None
                if n == 1 and self.l2 is None:
                    held = holdout_indices(labels, chosen, self.holdout_shots, seed, num_classes)
                    if held.size == 0:
                        raise ValueError(
                            f"fewshot: no example of split {train_split!r} is left beyond the "
                            "1-shot draw to choose L2 on; give a fixed l2, or leave out shots=1"
                        )
                draws[n, seed] = (chosen, held)
        needed = np.unique(
            np.concatenate([i for pair in draws.values() for i in pair if i is not None])
        )
        options = self._forward_options()
        features, feature_labels = extract_features(run, train_split, indices=needed, **options)
        test_features, test_labels = extract_features(run, test_split, **options)

        def rows(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            at = np.searchsorted(needed, indices)
            return features[at], feature_labels[at]

        results: dict[str, float] = {}
        for n in self.shots:
            accuracies, strengths = [], []
            for seed in self.seeds:
                chosen, held = draws[n, seed]
                x, y = rows(chosen)
                hx, hy = rows(held) if held is not None else (None, None)
                result = fewshot.fewshot_accuracy(
                    x,
                    y,
                    test_features,
                    test_labels,
                    num_classes,
                    l2=self.l2,
                    l2_grid=self.l2_grid,
                    holdout_features=hx,
                    holdout_labels=hy,
                    folds=self.folds,
                )
                accuracies.append(result.accuracy)
                strengths.append(result.l2)
            results[f"fewshot/{n}shot/mean"] = float(np.mean(accuracies))
            results[f"fewshot/{n}shot/std"] = float(np.std(accuracies))
            results[f"fewshot/{n}shot/l2"] = float(np.median(strengths))
        return results


def check_shots(
    labels: np.ndarray, num_classes: int, shots: int, split: str, dataset: Any = None
) -> None:
    """A ValueError naming every class of `split` with fewer than `shots` examples."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
    short = [c for c in range(num_classes) if counts[c] < shots]
    if not short:
        return
    names = tuple(getattr(dataset, "class_names", ()) or ())

    def label(c: int) -> str:
        return f"{c} ({names[c]!r})" if c < len(names) and names[c] != str(c) else str(c)

    listed = ", ".join(f"class {label(c)} has {int(counts[c])}" for c in short[:5])
    more = f" and {len(short) - 5} more" if len(short) > 5 else ""
    name = f" of dataset {dataset.name!r}" if getattr(dataset, "name", None) else ""
    smallest = int(counts.min())
    raise ValueError(
        f"fewshot: shots={shots} is more than the smallest class of split {split!r}{name} "
        f"has: {listed}{more} examples; use shots <= {smallest}"
    )


def holdout_indices(
    labels: np.ndarray, chosen: np.ndarray, per_class: int, seed: int, num_classes: int
) -> np.ndarray:
    """Up to `per_class` examples per class, not in `chosen`, drawn with (seed, class), sorted."""
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    picked = []
    for c in range(num_classes):
        members = rest[labels[rest] == c]
        rng = np.random.default_rng([seed, c, 1])  # few_shot_indices draws with [seed, c]
        picked.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# The trainer's callback.


class EvalCallback(Callback):
    """Runs evaluators on the trainer's parameters at its evaluation steps.

    The trainer hands its live variables (params, router state) and `Setup` to callbacks at each
    evaluation (`on_evaluate`, right after its own evaluation, before `on_eval`); at the final step
    and at each step that is a multiple of `every_steps` (default: the config's `eval.every_steps`;
    0: only the final one), this callback wraps them in a `loading.LoadedRun` and runs its
    evaluators then: nothing is read from disk and no checkpoint is waited for, and the results are
    those `loading.load_run` of the step's checkpoint would give. The trainer evaluates at multiples
    of `eval.every_steps` (and at checkpoint steps with `checkpoint.keep_best`), so a smaller
    `every_steps` than that adds no evaluation. Results go to `workdir/eval/<step>.json` and one
    printed line (main process); `results` keeps them by step. Every process runs the evaluators
    (they are collective with several processes).

    Args:
      evaluators: specs (see `make_evaluators`): names, (name, options) pairs or evaluators.
      every_steps: evaluate at the trainer's evaluation steps that are multiples of this
        (None: `eval.every_steps`; 0: only the final step).
    """

    def __init__(
        self, evaluators: Iterable[EvaluatorSpec] = (), *, every_steps: int | None = None
    ) -> None:
        self.evaluators = make_evaluators(evaluators)
        if every_steps is not None:
            every_steps = vmoe_plugins.check_int("every_steps", every_steps, 0)
        self.every_steps = every_steps
        self.results: dict[int, dict[str, float]] = {}
        self._run: RunInfo | None = None

    @classmethod
    def from_run(cls, run: RunInfo) -> EvalCallback:
        """The callback "evaluators": `config.eval.evaluators` if the config has it, else none."""
        return cls(tuple(config_get(run.config, "eval.evaluators", ()) or ()))

    def on_train_start(self, run: RunInfo) -> None:
        self._run = run
        if self.every_steps is None:
            self.every_steps = int(config_get(run.config, "eval.every_steps", 0) or 0)

    def on_evaluate(self, step: int, variables: Any, setup: setup_lib.Setup) -> None:
        run = self._run
        if not self.evaluators or run is None or step in self.results:
            return
        if step != run.num_steps and not (self.every_steps and step % self.every_steps == 0):
            return
        # The variables are live (the next train step donates them): used here, never kept.
        live = LoadedRun(
            run.workdir / "checkpoints",
            step,
            setup.config,
            setup,
            variables["params"],
            dict(variables.get(vl.ROUTER_STATE, {})),
        )
        results: dict[str, float] = {}
        for evaluator in self.evaluators:
            results.update(evaluator.evaluate(live))
        self.results[step] = results
        if run.is_main_process:
            out = run.workdir / "eval" / f"{step}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"step": step, **results}, indent=2) + "\n")
            shown = ", ".join(f"{k}={_format(v)}" for k, v in results.items())
            tqdm.tqdm.write(f"vmoe-eval: step {step}: {shown} ({out})")


def _format(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


register()
