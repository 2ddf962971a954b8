"""Test, lint, build and benchmark sessions for the vmoe monorepo.

`nox` runs the default set: one test session per package (each in a virtualenv that holds only
that package, its declared dependencies and its `test` extra, so a missing dependency or an
upward import fails), the integration tests, and lint; `nox -s tests-extended` runs the tests
marked `extended` that the default run leaves out. `nox -l` lists every session.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tomllib

import nox

ROOT = pathlib.Path(__file__).parent
# Every separately versioned distribution in the repo, by short session name.
PROJECTS = {
    "plugins": "packages/vmoe-plugins",
    "routing": "packages/vmoe-routing",
    "layers": "packages/vmoe-layers",
    "data": "packages/vmoe-data",
    "train": "packages/vmoe-train",
    "eval": "packages/vmoe-eval",
    "router-hash": "plugins/vmoe-router-hash",
    "router-expert-choice": "plugins/vmoe-router-expert-choice",
    "router-dropless": "plugins/vmoe-router-dropless",
    "router-soft": "plugins/vmoe-router-soft",
    "router-aux-free": "plugins/vmoe-router-aux-free",
    "router-group-limited": "plugins/vmoe-router-group-limited",
    "experts-extra": "plugins/vmoe-experts-extra",
    "moe-fine-grained": "plugins/vmoe-moe-fine-grained",
    "moe-shared-experts": "plugins/vmoe-moe-shared-experts",
}

nox.options.sessions = [f"tests-{name}" for name in PROJECTS] + ["integration", "lint"]
nox.options.error_on_external_run = True
# uv builds the session venvs 3x faster than pip (tests-train: 25 s vs 84 s to install, both with
# warm caches) where it is installed (`pip install nox uv`; CI does); else virtualenv + pip.
nox.options.default_venv_backend = "uv|virtualenv"
# The test runner's parallelism is the test sessions' choice, not a package's test requirement.
XDIST = "pytest-xdist>=3.5"


def _project(folder: str) -> dict:
    with open(ROOT / folder / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _dist_name(requirement: str) -> str:
    """The distribution a requirement names: "vmoe-routing>=0.1,<0.2" -> "vmoe-routing"."""
    dist = requirement.split(";")[0].split("[")[0]
    for sep in "<>=!~ ":
        dist = dist.split(sep)[0]
    return dist


_FOLDER_BY_DIST = {_project(folder)["name"]: folder for folder in PROJECTS.values()}


def _local_closure(folder: str, extras: str = "") -> list[str]:
    """The repo folders `folder` depends on (transitively), dependencies first, itself last.

    Our packages are not on any index; installing them from their folders explicitly keeps pip
    from ever looking for a `vmoe-*` distribution elsewhere. Local packages named in `folder`'s
    `extras` (e.g. a plugin its tests use) count as dependencies too.
    """
    order: list[str] = []
    optional = _project(folder).get("optional-dependencies", {})
    extra_requirements = [r for e in extras.split(",") if e for r in optional.get(e, [])]

    def visit(f: str) -> None:
        own_extras = extra_requirements if f == folder else []
        for requirement in [*_project(f).get("dependencies", []), *own_extras]:
            dist = _dist_name(requirement)
            if dist in _FOLDER_BY_DIST and _FOLDER_BY_DIST[dist] not in order:
                visit(_FOLDER_BY_DIST[dist])
        if f not in order:
            order.append(f)

    visit(folder)
    return order


def _install(session: nox.Session, folder: str, extras: str = "test", *more: str) -> None:
    *deps, own = _local_closure(folder, extras)
    session.install(*deps, f"./{own}[{extras}]" if extras else f"./{own}", *more)


def _every_folder(extras: str = "") -> list[str]:
    """Every project folder, each after the local packages it depends on (with `extras`)."""
    folders: list[str] = []
    for folder in PROJECTS.values():
        folders += [f for f in _local_closure(folder, extras) if f not in folders]
    return folders


# Test folders whose files share work among their tests: a module fixture (the 8-device
# subprocess, a trained run) or a per-process cache of compiled programs. Their files go whole to
# one worker (`loadfile`), so that work is done once. The others' tests are handed out one by
# one, a worker taking the next when it is free (`worksteal`): 2 workers, vmoe-routing 104 ->
# 96 s, vmoe-router-dropless 44 -> 31 s.
WHOLE_FILES = {"layers", "data", "train", "eval", "integration"}


def _parallel(name: str) -> list[str]:
    """pytest-xdist arguments for a test session: a worker per CPU core, at most 4.

    Most of a test's time is XLA compiling small programs, partly on one thread: on 2 cores two
    workers take vmoe-routing's tests from 226 s to 118 s and vmoe-train's from 298 s to 239 s.
    VMOE_TEST_WORKERS=0 runs in one process, as does `nox -s tests-routing -- -n 0` (pytest
    takes the last -n).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = os.environ.get("VMOE_TEST_WORKERS") or str(min(cores or 1, 4))
    if workers == "0":
        return []
    return ["-n", workers, "--dist", "loadfile" if name in WHOLE_FILES else "worksteal"]


_CACHE_RUNS: set[str] = set()  # the cache folders this `nox` invocation has emptied


# XLA:CPU spends most of a small program's compile time in LLVM's optimisation passes, and a test
# runs each program once or a few times: tests compile with LLVM at -O0 (same results: every
# test passes either way). Measured on 2 cores, the tests of vmoe-train 324 -> 189 s and of
# vmoe-layers 306 -> 151 s. Benchmarks and reproduction sessions keep XLA's default, as users do.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def _test_env(session: nox.Session, **more: str) -> dict[str, str]:
    """The environment of a pytest session: TEST_XLA_FLAGS appended to XLA_FLAGS (tests that
    start subprocesses with flags of their own append theirs to it), the compilation cache,
    and `more`."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
    return {"XLA_FLAGS": flags, **_compilation_cache(session), **more}


def _compilation_cache(session: nox.Session) -> dict[str, str]:
    """XLA's persistent compilation cache for one `nox` invocation, emptied when its first test
    session starts and shared by its later ones.

    Tests that compile the same program (the tiny V-MoE that several trainer tests train, the
    same model in several files or packages, pytest and its subprocesses) compile it once;
    nothing carries over from one invocation to the next. Only programs that take over a second
    to compile are kept (jax's default); a program's key covers its HLO, the compile options
    and the jax/jaxlib versions, which every session installs alike. Measured on 2 cores, per
    session: vmoe-train 203 -> 191 s, vmoe-layers 197 -> 182 s.
    """
    path = (ROOT / ".nox" / "xla-cache").resolve()  # absolute: tests may chdir
    if str(path) not in _CACHE_RUNS:
        shutil.rmtree(path, ignore_errors=True)
        _CACHE_RUNS.add(str(path))
    return {"JAX_COMPILATION_CACHE_DIR": str(path)}


def _make_test_session(name: str, folder: str) -> None:
    @nox.session(name=f"tests-{name}")
    def tests(session: nox.Session) -> None:
        _install(session, folder, "test", XDIST)
        session.run(
            "pytest",
            *_parallel(name),
            f"{folder}/tests",
            *session.posargs,
            env=_test_env(session),
        )

    tests.__doc__ = f"Tests of {folder}, installed alone with its declared dependencies."


for _name, _folder in PROJECTS.items():
    _make_test_session(_name, _folder)


@nox.session
def integration(session: nox.Session) -> None:
    """Tests across packages, installed the way users install them (incl. a fresh venv)."""
    session.install(*(f"./{f}" for f in _every_folder()), "pytest", "hypothesis", XDIST)
    session.run(
        "pytest",
        *_parallel("integration"),
        "integration/tests",
        *session.posargs,
        env=_test_env(session),
    )


@nox.session(name="tests-extended")
def tests_extended(session: nox.Session) -> None:
    """The tests the default run leaves out (`@pytest.mark.extended`: further cases of contracts
    the default run checks once), every package's and integration's, in one venv with all."""
    with_tests = [
        f"./{f}[test]" if "test" in _project(f).get("optional-dependencies", {}) else f"./{f}"
        for f in _every_folder("test")
    ]
    session.install(*with_tests, "pytest", "hypothesis", XDIST)
    folders = {**PROJECTS, "integration": "integration"}
    for name, folder in folders.items():
        # Exit status 5: nothing in that folder is marked extended.
        session.run(
            "pytest",
            *_parallel(name),
            "-m",
            "extended",
            f"{folder}/tests",
            *session.posargs,
            success_codes=[0, 5],
            env=_test_env(session),
        )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole repository."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def build(session: nox.Session) -> None:
    """Build every package's sdist and wheel and check their metadata (twine check)."""
    session.install("build>=1.2", "twine>=5")
    out = ROOT / "dist"
    shutil.rmtree(out, ignore_errors=True)  # check only what this run built
    for folder in PROJECTS.values():
        session.run(
            "python", "-m", "build", "--outdir", str(out / pathlib.Path(folder).name), folder
        )
    session.run("twine", "check", "--strict", *sorted(str(p) for p in out.glob("*/*")))


# hash, aux-free: in vmoe-layers' test extra
MATRIX_PLUGIN_ROUTERS = ("expert-choice", "soft", "dropless", "group-limited")


@nox.session(name="sharding-matrix")
def sharding_matrix(session: nox.Session) -> None:
    """Every sharding strategy on every 8-device mesh (1x8, 2x4, 4x2) vs one device, for every
    router (top_k, bpr and the plugins hash, aux_free, expert_choice, soft, dropless,
    group_limited): loss, gradients, aux losses, metrics and a stateful router's state after 3
    steps (80 compiled train steps; the default tests-layers run covers BPR and aux_free on
    every case), and the expert strategies across two processes vs one."""
    _install(session, PROJECTS["layers"])
    session.install(*(f"./plugins/vmoe-router-{name}" for name in MATRIX_PLUGIN_ROUTERS))
    session.run(
        "pytest",
        "packages/vmoe-layers/tests/test_sharding_matrix.py",
        "packages/vmoe-layers/tests/test_multidevice.py::"
        "test_two_processes_with_the_expert_strategies_equal_one_process",
        *session.posargs,
        env=_test_env(session, VMOE_SHARDING_MATRIX="1"),
    )


@nox.session
def faults(session: nox.Session) -> None:
    """The trainer under faults: kill -9 at random moments (one mid-step, one while an async
    checkpoint is written, six from outside at random times) with storage that fails the first
    read of every checkpoint; the final params must be bit-identical to an uninterrupted run's,
    and no complete checkpoint may be deleted (packages/vmoe-train/tests/test_faults.py; a few
    minutes; `VMOE_FAULTS_SEED=<n>` for other kill times). Also the multi-process and 8-device
    trainer cases left out of the default run (VMOE_TRAIN_EXTRA=1)."""
    _install(session, PROJECTS["train"])
    session.run(
        "pytest",
        "packages/vmoe-train/tests/test_faults.py",
        "packages/vmoe-train/tests/test_processes.py",
        *session.posargs,
        env=_test_env(session, VMOE_FAULTS="1", VMOE_TRAIN_EXTRA="1"),
    )


@nox.session(name="recipe-smoke")
def recipe_smoke(session: nox.Session) -> None:
    """Every shipped paper recipe (vmoe_train.configs: the V-MoE release's S/32 and B/16
    pre-training and 384 px fine-tuning) builds, validates, trains 2 steps and evaluates on
    synthetic images, each fine-tuning starting from its pre-training run; the data, the length
    and the batch are overridden, and V-MoE-B/16 keeps 4 of its 12 blocks (memory)
    (packages/vmoe-train/tests/test_recipe_smoke.py says which fields; VMOE_RECIPE_SMOKE=1;
    2 min 39 s on 2 cores, venv install included)."""
    _install(session, PROJECTS["train"])
    session.run(
        "pytest",
        "packages/vmoe-train/tests/test_recipe_smoke.py",
        "--durations=0",
        *session.posargs,
        env=_test_env(session, VMOE_RECIPE_SMOKE="1"),
    )


@nox.session(name="bench-fit")
def bench_fit(session: nox.Session) -> None:
    """What fits where (benchmarks/bench_fit.py): planned memory per device, the largest batch
    per device in 80 GB, bytes sent by role, and the fewest devices for V-MoE-H/14, of Adam
    train steps compiled deviceless by XLA's TPU compiler (jax[tpu]: libtpu, no TPU needed;
    XLA:CPU plans no rematerialisation). Compiled points are kept in benchmarks/fit-points.json,
    so a run resumes and an unchanged table prints without compiling."""
    _install(session, PROJECTS["layers"], "", "jax[tpu]", "optax")
    session.run("python", "benchmarks/bench_fit.py", *session.posargs)


@nox.session(name="bench-comm")
def bench_comm(session: nox.Session) -> None:
    """Bytes each device sends per collective kind, and planned memory, of one V-MoE-S/32 and
    V-MoE-B/16 train step under every strategy on 8..64 simulated CPU devices
    (benchmarks/bench_comm.py: table on stdout, JSON in bench-results/comm.json, the plot in
    benchmarks/comm.png); exits 1 if the expert strategy's all-to-all bytes per MoE layer
    vary by more than 10% from 8 to 64 devices."""
    _install(session, PROJECTS["layers"], extras="")
    session.install("matplotlib")
    session.run("python", "benchmarks/bench_comm.py", *session.posargs)


@nox.session(name="bench-smoke")
def bench_smoke(session: nox.Session) -> None:
    """Short runs of the benchmark scripts (moe layer, trainer, evaluation, communication, GPU
    script on the CPU) checking that they run and report what their labels say
    (integration/tests/test_benchmarks.py and test_bench_eval.py with VMOE_BENCH_SMOKE=1;
    about 2.5 minutes; not in the default run)."""
    session.install(*(f"./{f}" for f in _every_folder()), "pytest", "hypothesis")
    session.run(
        "pytest",
        "integration/tests/test_benchmarks.py",
        "integration/tests/test_bench_eval.py",
        *session.posargs,
        env={"VMOE_BENCH_SMOKE": "1"},
    )


@nox.session(name="bench-resume-memory")
def bench_resume_memory(session: nox.Session) -> None:
    """Peak memory of resuming vs training (benchmarks/bench_resume_memory.py: V-MoE-S/32, each
    phase its own process); exits 1 if resuming peaks above training."""
    _install(session, PROJECTS["train"], extras="")
    session.run("python", "benchmarks/bench_resume_memory.py", *session.posargs)


@nox.session(name="bench-data")
def bench_data(session: nox.Session) -> None:
    """Images/s of the vmoe-data train pipeline vs measured train steps (is it the bottleneck?).

    benchmarks/bench_data.py runs vmoe-data's own pipeline benchmark
    (packages/vmoe-data/benchmarks/bench_pipeline.py, vmoe-data only) next to vmoe-layers models.
    """
    _install(session, PROJECTS["data"], extras="")
    _install(session, PROJECTS["layers"], extras="")  # real train steps to compare against
    session.run("python", "benchmarks/bench_data.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """MoE benchmarks: routers, dispatch paths, the MoE layer vs dense MLPs, train steps,
    dropless routing vs top_k (benchmarks/bench_dropless.py).

    Tables on stdout, JSON in bench-results/. `nox -s bench -- --quick` for the target cases.
    The MoE layer suite runs with vmoe_train.tune_cpu_malloc(), then its target cases again
    with the C library's default allocator (bench-results/moe_layer_default_malloc.json).
    """
    folders: list[str] = []
    plugins = (PROJECTS["router-hash"], PROJECTS["router-dropless"])
    for folder in (PROJECTS["train"], *plugins):  # train: tune_cpu_malloc
        folders += [f for f in _local_closure(folder, "") if f not in folders]
    session.install(*(f"./{f}" for f in folders))
    session.run("python", "benchmarks/bench_routing.py", *session.posargs)
    session.run("python", "benchmarks/bench_moe_layer.py", *session.posargs)
    dropless = ["--smoke"] if "--smoke" in session.posargs else []
    session.run("python", "benchmarks/bench_dropless.py", *dropless)
    # The target cases again with the C library's default allocator, for comparison.
    default_json = "--json=bench-results/moe_layer_default_malloc.json"
    session.run(
        "python", "benchmarks/bench_moe_layer.py", "--quick", "--malloc=default", default_json
    )


@nox.session(name="bench-train")
def bench_train(session: nox.Session) -> None:
    """The trainer's images/s vs a bare jitted train-step loop (same model and batches).

    benchmarks/bench_train.py: `vmoe_train.train` on digits_vmoe (data read step by step,
    metrics, callbacks, async checkpoints) and the bare step in turns; exits 1 when the median
    overhead is over 5%. Table on stdout, JSON in bench-results/train.json.
    """
    _install(session, PROJECTS["train"], extras="")
    session.run("python", "benchmarks/bench_train.py", *session.posargs)


@nox.session(name="bench-eval")
def bench_eval(session: nox.Session) -> None:
    """Images/s of vmoe-eval's accuracy evaluator vs the train step's forward pass, in turns.

    benchmarks/bench_eval.py on the digits V-MoE; table on stdout, JSON in
    bench-results/eval.json.
    """
    _install(session, PROJECTS["eval"], extras="")
    session.run("python", "benchmarks/bench_eval.py", *session.posargs)


# The plugins claim h's trainings use (reproduce/experiments.py).
REPRODUCE_PLUGINS = ("router-aux-free", "moe-fine-grained", "moe-shared-experts")


@nox.session
def reproduce(session: nox.Session) -> None:
    """V-MoE's claims at small scale: reproduce/run.py trains and evaluates every experiment
    (3 seeds, 63 runs) and writes docs/results/ (JSON, PNG, summary.md). Not in the default
    set: about 65 minutes on 2 cores (40 measured for claims a-f; g's 9 and h's 18 runs
    estimated from runs timed under load: README). Arguments
    go to the script (e.g. `-- --claims a_bpr`, `-- --dataset tfds:cifar10`)."""
    _install(session, PROJECTS["eval"], extras="")
    session.install(*(f"./{PROJECTS[name]}" for name in REPRODUCE_PLUGINS))
    session.run("python", "reproduce/run.py", *session.posargs)


@nox.session(name="reproduce-smoke")
def reproduce_smoke(session: nox.Session) -> None:
    """reproduce/run.py end to end on a generated image folder by its `--dataset` flag: every
    claim, 10 steps, one seed (21 trainings; integration/tests/test_reproduce_smoke.py)."""
    _install(session, PROJECTS["eval"])
    session.install(*(f"./{PROJECTS[name]}" for name in REPRODUCE_PLUGINS))
    session.run(
        "pytest",
        "integration/tests/test_reproduce_smoke.py",
        *session.posargs,
        env={"VMOE_REPRODUCE_SMOKE": "1"},
    )


def _interpreter(version: str) -> str | None:
    """A working `python<version>`: on PATH, or under pyenv's versions folder."""
    candidates = [shutil.which(f"python{version}")]
    pyenv_root = pathlib.Path(os.environ.get("PYENV_ROOT", pathlib.Path.home() / ".pyenv"))
    candidates += sorted(str(p) for p in pyenv_root.glob(f"versions/{version}.*/bin/python3"))
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "--version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return candidate
    return None


@nox.session(name="lowest-routing")
def lowest_routing(session: nox.Session) -> None:
    """vmoe-plugins and vmoe-routing tests at their floors: the lowest Python their pyprojects
    allow (3.10) and the lowest versions of their direct requirements.

    Every requirement of the two pyprojects (dependencies and the `test` extra) is handed to uv
    as a direct requirement with `--resolution lowest-direct`, so jax, numpy, pluggy, pytest and
    hypothesis install at their floors (transitive ones, e.g. jaxlib, at the newest that fits),
    into a virtualenv of Python 3.10 (found on PATH or under pyenv; `-- --python=/path` to
    choose). Not in the default set: it downloads old wheels. A floor that fails here must be
    raised.
    """
    args = [a for a in session.posargs if not a.startswith("--python=")]
    chosen = [a.split("=", 1)[1] for a in session.posargs if a.startswith("--python=")]
    interpreter = chosen[0] if chosen else _interpreter("3.10")
    if interpreter is None:
        session.error("no Python 3.10 found; pass one: nox -s lowest-routing -- --python=PATH")
    session.install("uv")
    folders = (PROJECTS["plugins"], PROJECTS["routing"])
    requirements: list[str] = []
    for folder in folders:
        project = _project(folder)
        optional = project.get("optional-dependencies", {})
        for requirement in [*project.get("dependencies", []), *optional.get("test", [])]:
            if _dist_name(requirement) not in _FOLDER_BY_DIST and requirement not in requirements:
                requirements.append(requirement)  # ours come from their folders below
    venv = pathlib.Path(session.create_tmp()) / "floor-venv"
    session.run("uv", "venv", "--python", interpreter, str(venv))
    python = str(venv / "bin" / "python")
    session.run(
        *("uv", "pip", "install", "--python", python, "--resolution", "lowest-direct"),
        *(f"./{folder}" for folder in folders),
        *requirements,
    )
    session.run("uv", "pip", "list", "--python", python)
    session.run(python, "--version", external=True)
    session.run(
        python, "-m", "pytest", *(f"{folder}/tests" for folder in folders), *args, external=True
    )
