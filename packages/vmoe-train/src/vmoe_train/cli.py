"""The `vmoe-train` command (also `python -m vmoe_train`): load a config, override, check, train.

    vmoe-train --config=digits_vmoe --config.model.moe.router=bpr \\
        --config.model.moe.router_options.k=1 --workdir=runs/x

The config is validated before anything compiles; its problems are printed all at once (exit
status 2). Then `vmoe_train.trainer.train(config, workdir)` runs and prints its own summary.

    vmoe-train convert ckpts/vmoe_s32_last2_ilsvrc2012 --config=vmoe_s32_last2_i1k \\
        --workdir=runs/s32

converts a checkpoint of the original V-MoE release into a run (`vmoe_train.original`), and

    vmoe-train export runs/s32 exported/s32 --step=500 --shards=2

writes a run's parameters back in the release's format.
"""

from __future__ import annotations

import datetime
import difflib
import importlib
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Sequence

from vmoe_train.config import (
    DEFAULT_CONFIG,
    ConfigError,
    apply_overrides,
    check_config,
    config_name,
    load_config,
    shipped_configs,
    validate_config,
)

PROG = "vmoe-train"
USAGE = f"""\
usage: {PROG} [--config=NAME|PATH] [--config.FIELD=VALUE ...] [--workdir=DIR]
                  [--check] [--list-configs] [--help]

Trains a ViT / V-MoE from a config: a shipped name (see --list-configs) or a .py file with
get_config() returning an ml_collections.ConfigDict.

options:
  --config=NAME|PATH       the config (default: {DEFAULT_CONFIG})
  --config.FIELD=VALUE     override a field, e.g. --config.model.moe.router=bpr; any number;
                           values are Python literals (3, 1e-3, (2, 4), 'x') or plain text;
                           `--config.FIELD VALUE` works too
  --workdir=DIR            where checkpoints, metrics and the config go
                           (default: runs/<config name>-<UTC time>)
  --check                  validate the config only: print OK or its problems (exit 0 / 2)
  --list-configs           list the shipped configs with what each trains
  -h, --help               show this message

The config is validated before anything compiles, every problem at once (exit status 2).

  {PROG} convert CHECKPOINT ...   convert an original V-MoE checkpoint or a vit_jax .npz file
                                  (see {PROG} convert -h)
  {PROG} export RUN PREFIX ...    write a run's parameters as one (see {PROG} export -h)
"""
CONVERT_USAGE = f"""\
usage: {PROG} convert CHECKPOINT --workdir=DIR [--config=NAME|PATH] [--config.FIELD=VALUE ...]

Converts a checkpoint of the original V-MoE release (CHECKPOINT: its prefix, or its .index file,
with the .data-nnnnn-of-mmmmm shards beside it), or a dense ViT of google-research/
vision_transformer (CHECKPOINT: its .npz file; the model is then model.name=ViT), into a run
every vmoe tool reads: an orbax checkpoint DIR/checkpoints/0 with the parameters and a config.
The config is --config (default: {DEFAULT_CONFIG}) with its model taken from the checkpoint,
any size (model.name=V-MoE with model.patch_size, hidden_size, num_layers, num_heads, mlp_dim),
and the release's routing settings (K=2, capacity multiple of 4, evaluation capacity factor
4.0, groups of 8 images, bfloat16 dispatch), then the --config.FIELD overrides. Its dataset
must have the head's classes and its pp the checkpoint's image size (every mismatch is
reported, by path, at once); model fields given explicitly (sizes set in --config, any model
override) must agree with the checkpoint.

  vmoe-eval all DIR                                      evaluate it
  {PROG} --config=... --config.finetune.init_from=DIR    fine-tune from it
"""
EXPORT_USAGE = f"""\
usage: {PROG} export RUN PREFIX [--step=N] [--shards=K]

Writes the parameters of RUN (a run directory, its checkpoints/ or one <step>/ directory) at
its latest checkpoint, or at step N, as a checkpoint of the original V-MoE release: PREFIX.index
and PREFIX.data-nnnnn-of-mmmmm, which the release's code reads
(vmoe.checkpoints.partitioned.restore_checkpoint) and `{PROG} convert` converts back, bit for
bit. The experts are split over K shards along their expert axis (default 1), as the release
stored them. Existing files of a checkpoint PREFIX are not overwritten.

options:
  --step=N     the checkpoint's step (default: the latest, or the <step>/ directory's)
  --shards=K   data shards to write (default: 1)
"""
FLAGS = ("--config", "--workdir", "--check", "--list-configs", "--help")
EXPORT_FLAGS = ("--step", "--shards", "--help")


class _UsageError(Exception):
    pass


class _Args:
    def __init__(self) -> None:
        self.config = DEFAULT_CONFIG
        self.overrides: list[str] = []
        self.workdir: str | None = None
        self.check = False
        self.list_configs = False
        self.help = False
        self.positional: list[str] = []


def _parse(argv: Sequence[str], *, positional: bool = False) -> _Args:
    args = _Args()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        flag, sep, value = arg.partition("=")

        def take_value(flag: str = flag, sep: str = sep, value: str = value) -> str:
            nonlocal i
            if sep:
                return value
            if i >= len(argv) or argv[i].startswith("--"):
                raise _UsageError(f"{flag} needs a value: {flag}=VALUE")
            i += 1
            return argv[i - 1]

        if arg in ("-h", "--help"):
            args.help = True
        elif arg == "--check":
            args.check = True
        elif arg == "--list-configs":
            args.list_configs = True
        elif flag == "--config":
            args.config = take_value()
        elif flag == "--workdir":
            args.workdir = take_value()
            if not args.workdir:
                raise _UsageError("--workdir needs a directory")
        elif flag.startswith("--config."):
            field = flag[len("--config.") :]
            if not field:
                raise _UsageError(f"{arg!r}: name a field, e.g. --config.model.moe.router=bpr")
            args.overrides.append(f"{field}={take_value()}")
        elif positional and not arg.startswith("-"):
            args.positional.append(arg)
        else:
            hint = difflib.get_close_matches(flag, FLAGS, n=1)
            maybe = f" (did you mean {hint[0]}?)" if hint else ""
            raise _UsageError(f"unknown argument {arg!r}{maybe}")
    return args


def _default_workdir(name: str) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{name}-{stamp}")


def _cpu_only() -> bool:
    """Whether jax will run on the CPU, judged without starting it (no accelerator plugin)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return False
    try:
        import jax_plugins  # namespace package of the CUDA / ROCm plugins
    except ImportError:
        return True
    return not any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def _tune_cpu_malloc() -> None:
    """On CPU, have glibc keep freed memory before XLA starts (see vmoe_train.host)."""
    if _cpu_only():
        from vmoe_train.host import tune_cpu_malloc

        tune_cpu_malloc()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `vmoe-train` with `argv` (default: sys.argv[1:]); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:
        return _convert(argv[1:])
    if argv[:1] == ["export"]:
        return _export(argv[1:])
    try:
        args = _parse(argv)
    except _UsageError as error:
        print(f"{PROG}: {error}\nTry '{PROG} --help'.", file=sys.stderr)
        return 2
    if args.help:
        print(USAGE, end="")
        return 0
    if args.list_configs:
        configs = shipped_configs()
        width = max((len(name) for name in configs), default=0)
        for name, line in configs.items():
            print(f"{name:<{width}}  {line}")
        return 0
    try:
        config = apply_overrides(load_config(args.config), args.overrides)
        processes = config.distributed.num_processes
        distributed = bool(config.distributed.coordinator_address)
        if args.check:
            return _check(config, processes, distributed)
        if (distributed or processes != 1) and args.workdir is None:
            raise ConfigError(
                [
                    "--workdir: required for a multi-process run (distributed.*): every process "
                    "must write to the same directory"
                ]
            )
        _tune_cpu_malloc()
        if distributed:
            # jax.distributed.initialize must come before jax counts devices: the trainer calls
            # it, then checks the devices; everything else is checked here, before connecting.
            check_config(config, num_processes=processes)
        else:
            import jax

            check_config(config, num_devices=jax.device_count(), num_processes=processes)
        workdir = args.workdir or _default_workdir(config_name(args.config))
        trainer = importlib.import_module("vmoe_train.trainer")
        trainer.train(config, workdir)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    return 0


def _check(config, processes: int, distributed: bool) -> int:
    """`--check`: validate for this machine's devices (not in a multi-process run)."""
    devices = None
    if not distributed:
        import jax

        devices = jax.device_count()
    problems = validate_config(config, num_devices=devices, num_processes=processes)
    if problems:
        print(ConfigError(problems), file=sys.stderr)
        return 2
    where = "devices not checked" if devices is None else f"{devices} device(s)"
    print(f"OK ({where}, {processes} process(es))")
    return 0


def _convert(argv: Sequence[str]) -> int:
    """`vmoe-train convert CHECKPOINT --workdir=DIR ...` (see CONVERT_USAGE)."""
    try:
        args = _parse(argv, positional=True)
        if args.help:
            print(CONVERT_USAGE, end="")
            return 0
        if args.check or args.list_configs:
            raise _UsageError("--check and --list-configs are not options of convert")
        if len(args.positional) != 1:
            raise _UsageError(f"convert takes one CHECKPOINT; got {args.positional or 'none'}")
        if args.workdir is None:
            raise _UsageError("convert needs --workdir=DIR (where the converted run goes)")
    except _UsageError as error:
        print(f"{PROG} convert: {error}\nTry '{PROG} convert --help'.", file=sys.stderr)
        return 2
    from vmoe_train.original import FormatError, convert

    try:
        config = load_config(args.config)
        converted = convert(args.positional[0], args.workdir, config, args.overrides)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, FormatError, ValueError) as error:
        print(f"{PROG} convert: {error}", file=sys.stderr)
        return 1
    arch = converted.architecture
    experts = (
        f"{arch.num_experts} experts in blocks {list(arch.moe_layers)}"
        if arch.moe_layers
        else "no MoE blocks"
    )
    sizes = (
        f"patch {arch.patch_size}, hidden {arch.hidden_size}, {arch.num_layers} blocks, "
        f"{arch.num_heads} heads, MLP {arch.mlp_dim}"
    )
    print(
        f"{PROG} convert: {converted.config.model.name} ({sizes}; {experts}; {arch.classifier} "
        f"classifier; {arch.num_classes} classes), {converted.num_arrays} arrays\n"
        f"  checkpoint: {converted.checkpoint}\n"
        f"  evaluate: vmoe-eval all {args.workdir}\n"
        f"  fine-tune: {PROG} --config=... --config.finetune.init_from={args.workdir}"
    )
    if converted.skipped:
        print(f"  not parameters, not converted: {len(converted.skipped)} arrays")
    return 0


def _export(argv: Sequence[str]) -> int:
    """`vmoe-train export RUN PREFIX [--step=N] [--shards=K]` (see EXPORT_USAGE)."""
    try:
        positional, options = _parse_export(argv)
        if options.get("help"):
            print(EXPORT_USAGE, end="")
            return 0
        if len(positional) != 2:
            raise _UsageError(f"export takes RUN and PREFIX; got {positional or 'none'}")
    except _UsageError as error:
        print(f"{PROG} export: {error}\nTry '{PROG} export --help'.", file=sys.stderr)
        return 2
    from vmoe_train.checkpoints import CheckpointError
    from vmoe_train.original import export_run
    from vmoe_train.original.export import run_step

    run, prefix = positional
    try:
        _, step = run_step(run, options.get("step"))
        files = export_run(run, prefix, step=step, num_shards=options.get("shards", 1))
    except (FileNotFoundError, FileExistsError, CheckpointError, ValueError) as error:
        print(f"{PROG} export: {error}", file=sys.stderr)
        return 1
    print(
        f"{PROG} export: step {step} of {run} -> {files[0]} and {len(files) - 1} data shard(s)\n"
        f"  back: {PROG} convert {files[0]} --config=... --workdir=DIR"
    )
    return 0


def _parse_export(argv: Sequence[str]) -> tuple[list[str], dict[str, int | bool]]:
    """(positional arguments, {"step": N, "shards": K, "help": True} as given)."""
    positional: list[str] = []
    options: dict[str, int | bool] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        flag, sep, value = arg.partition("=")
        if arg in ("-h", "--help"):
            options["help"] = True
        elif flag in ("--step", "--shards"):
            if not sep:
                if i >= len(argv) or argv[i].startswith("--"):
                    raise _UsageError(f"{flag} needs a value: {flag}=N")
                value, i = argv[i], i + 1
            low = 0 if flag == "--step" else 1
            if not value.isdigit() or int(value) < low:
                raise _UsageError(f"{flag}={value!r} must be an integer >= {low}")
            options[flag[2:]] = int(value)
        elif not arg.startswith("-"):
            positional.append(arg)
        else:
            hint = difflib.get_close_matches(flag, EXPORT_FLAGS, n=1)
            maybe = f" (did you mean {hint[0]}?)" if hint else ""
            raise _UsageError(f"unknown argument {arg!r}{maybe}")
    return positional, options
