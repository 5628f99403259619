"""What every command line shares: which recipe (`--config-name`, `--config-path`, `--config`),
`--help` generated from the typed config, one-line errors, and the console scripts' entry points.

Imports nothing heavy (no torch, no megatron): `--help` and argument errors answer at once.
"""

import ast
import dataclasses
import inspect
import io
import json
import os
import signal
import sys
import textwrap
import tokenize

from nemo_optune.runtime.quiet import quiet_megatron_warnings

RECIPE_USAGE = (
    "[--config-name NAME] [--config-path DIR] [--config FILE.yaml] [-h | --help] [key=value ...]",
    """Recipe: --config-name NAME picks NAME.yaml of the package's recipes (listed below; default: {default});
--config-path DIR looks for NAME.yaml in DIR first (Hydra's convention; a relative DIR is taken
from the current directory), --config FILE.yaml is the shorthand for both. A recipe anywhere
may start with `defaults: [base, _self_]`: the package's recipes (base, layout/...) are found
after DIR. key=value overrides follow Hydra's syntax (e.g. trainer.iterations=4,
'reward.http.urls=[http://rm:8000]') and win over the recipe.""",
)


@dataclasses.dataclass
class Recipe:
    """What a command line asks for: the recipe, where to look for it first, the overrides."""

    name: str
    config_dir: str | None  # None: the package's recipes only
    overrides: list[str]
    help: bool = False


def parse_args(argv: list[str], default_config: str) -> Recipe:
    """`[--config-name NAME | -cn NAME] [--config-path DIR | -cp DIR] [--config FILE.yaml]
    [-h | --help] key=value ...`; ValueError naming the argument."""
    recipe, args, config_file = Recipe(default_config, None, []), list(argv), None

    def value(flag: str, what: str) -> str:
        if "=" in flag:
            return flag.split("=", 1)[1]
        if not args:
            raise ValueError(f"{flag} needs {what}")
        return args.pop(0)

    while args:
        arg = args.pop(0)
        flag = arg.split("=", 1)[0]
        if arg in ("-h", "--help"):
            recipe.help = True
        elif flag in ("--config-name", "-cn"):
            recipe.name = value(arg, "a recipe name")
        elif flag in ("--config-path", "-cp"):
            recipe.config_dir = value(arg, "a directory")
        elif flag == "--config":
            config_file = value(arg, "a recipe file (FILE.yaml)")
        elif arg.startswith("-") or "=" not in arg:
            raise ValueError(
                f"unknown argument {arg!r}: expected --config-name NAME, --config-path DIR, --config FILE.yaml, "
                f"--help and key=value overrides"
            )
        else:
            recipe.overrides.append(arg)
    if config_file is not None:
        if recipe.config_dir is not None or recipe.name != default_config:
            raise ValueError("--config FILE.yaml stands for --config-path and --config-name: give one or the other")
        if not config_file.endswith((".yaml", ".yml")):
            raise ValueError(f"--config {config_file}: expected a recipe file ending in .yaml")
        recipe.config_dir, recipe.name = os.path.dirname(config_file) or ".", os.path.basename(config_file)
    if recipe.name.endswith((".yaml", ".yml")):
        recipe.name = recipe.name.rsplit(".", 1)[0]
    if recipe.config_dir is not None:
        recipe.config_dir = os.path.abspath(recipe.config_dir)
        if not os.path.isdir(recipe.config_dir):
            raise ValueError(f"--config-path {recipe.config_dir}: no such directory")
    return recipe


def one_line(err: BaseException) -> str:
    """OmegaConf's messages span lines (value, full_key, types): keep the key on one line.
    Hydra's override errors say what failed; their cause says why (e.g. an unknown key)."""
    if err.__cause__ is not None and type(err).__name__ == "ConfigCompositionException":
        err = err.__cause__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    key = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("full_key:")), None)
    text = (lines[0] if lines else type(err).__name__).replace("is not in struct", "is not a config key")
    return f"config key {key}: {text}" if key and key not in text else text


def fail(message: str) -> None:
    """The one-line error and exit status 2; with several ranks, rank 0 prints it."""
    from nemo_optune.runtime.distributed import world_from_env

    if world_from_env()[0] == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def user_errors() -> tuple[type[BaseException], ...]:
    """What bad input raises: reported as one line, exit status 2 (anything else is a bug and
    keeps its traceback). OSError: e.g. a full disk while writing outputs."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from nemo_optune.rewards.resilient import RewardSourceError
    from nemo_optune.runtime import exp_dir
    from nemo_optune.runtime.checkpoint import CheckpointError

    return (
        ValueError,
        OmegaConfBaseException,
        HydraException,
        exp_dir.ExperimentDirError,
        CheckpointError,
        RewardSourceError,
        OSError,
    )


# ------------------------------------------------------------------------------ --help
def _field_comments(cls) -> dict[str, str]:
    """{field: its comment} from the class's source: the comment on the field's lines, else the
    comment lines right above it."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above, n = [], node.lineno - 1
        while n in comments and lines[n - 1].strip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        text = " ".join(own or above)
        if text:
            out[node.target.id] = text
    return out


def _class_doc(cls) -> str:
    """The first line of the class's own docstring (a dataclass without one gets its signature)."""
    try:
        node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    except (OSError, TypeError, SyntaxError):
        return ""
    return (ast.get_docstring(node) or "").split("\n\n")[0].replace("\n", " ")


def _scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value and value.strip() == value and value[0] not in "[{'\"" else json.dumps(value)
    return json.dumps(value) if isinstance(value, (list, dict)) else repr(value)


def config_keys_help(schema, groups: tuple[str, ...] | None = None) -> str:
    """Every key of the typed config `schema` (a dataclass) with its default and its comment,
    as YAML; top-level entries restricted to `groups` when given."""
    out = []

    def walk(instance, indent: str, names) -> None:
        comments = _field_comments(type(instance))
        for f in dataclasses.fields(instance):
            if names is not None and f.name not in names:
                continue
            value, comment = getattr(instance, f.name), comments.get(f.name, "")
            if dataclasses.is_dataclass(value):
                comment = comment or _class_doc(type(value))
                out.append(f"{indent}{f.name}:" + (f"  # {comment}" if comment else ""))
                walk(value, indent + "  ", None)
            else:
                line = f"{indent}{f.name}: {_scalar(value)}"
                if comment:  # wrapped at 120 columns, continuation lines under the comment
                    column = max(len(line) + 1, 40)
                    wrapped = textwrap.wrap(comment, max(40, 118 - column))
                    line = line.ljust(column) + f"# {wrapped[0]}"
                    out.extend([line] + [" " * column + f"# {rest}" for rest in wrapped[1:-1]])
                    line = " " * column + f"# {wrapped[-1]}" if len(wrapped) > 1 else None
                if line:
                    out.append(line)

    walk(schema(), "", groups)
    return "\n".join(out)


def recipe_names(directory: str) -> list[str]:
    return sorted(n[:-5] for n in os.listdir(directory) if n.endswith(".yaml") and n != "base.yaml")


def print_help(prog: str, description: str, schema, default_config: str, recipe_dir: str, groups=None) -> None:
    usage, how = RECIPE_USAGE
    print(
        f"usage: {prog} {usage}\n\n{description}\n\n{how.format(default=default_config)}\n\n"
        + textwrap.fill(f"recipes in {recipe_dir}: {', '.join(recipe_names(recipe_dir))}", 100)
        + "\n\n"
        "config keys, with the typed config's defaults (a recipe sets its own values; the key names and types\n"
        "are checked when the recipe and overrides are merged, the values at start-up, before any work):\n\n"
        + textwrap.indent(config_keys_help(schema, groups), "  ")
    )


def answer_help(
    argv: list[str], prog: str, description: str, schema, default_config: str, recipe_dir: str, groups=None
):
    """The parsed command line; with --help, the help is printed and the process exits 0. A bad
    argument is one line and exit status 2."""
    try:
        recipe = parse_args(argv, default_config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if recipe.help:
        print_help(prog, description, schema, default_config, recipe_dir, groups)
        sys.exit(0)
    return recipe


def run_main(argv: list[str] | None = None, default_config: str = "optune_tiny") -> None:
    """Entry point of the launchers: a recipe plus key=value overrides (Hydra
    syntax), experiment out. Bad input exits with status 2 and one line naming the key,
    file or line (rank 0 prints it)."""
    from nemo_optune.config import load_config
    from nemo_optune.run import run_experiment
    from nemo_optune.runtime import distributed
    from nemo_optune.runtime.lost_ranks import exit_for_lost_rank, is_collective_failure
    from nemo_optune.runtime.preemption import EXIT_STOPPED

    try:
        recipe = parse_args(sys.argv[1:] if argv is None else argv, default_config)
        typed = load_config(recipe.name, recipe.overrides, recipe.config_dir)
        summary = run_experiment(typed)
    except user_errors() as err:
        fail(one_line(err))
    except RuntimeError as err:  # a peer rank died or hangs: name it, exit non-zero, never wait on it
        if is_collective_failure(err):
            exit_for_lost_rank(err, typed.trainer.collective_timeout_seconds)
        raise
    if distributed.world_from_env()[0] == 0:
        if "heldout_reward_final" in summary:
            print(
                f"[done] held-out reward {summary['heldout_reward_initial']:.4f} -> "
                f"{summary['heldout_reward_final']:.4f} in {summary['wall_seconds']:.1f}s, "
                f"peak RSS {summary['peak_rss_mb']:.0f} MB"
            )
        elif "dry_run" not in summary:
            print(f"[done] {summary['method']} in {summary['wall_seconds']:.1f}s")
        if "dry_run" not in summary:
            print(os.path.abspath(typed.exp_manager.exp_dir))
    if summary.get("stopped_by"):  # srun may signal the ranks still shutting down: exit 3, not 143
        for name in typed.trainer.stop_signals:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    distributed.shutdown()
    if summary.get("stopped_by"):
        sys.exit(EXIT_STOPPED)


# ---------------------------------------------------------------- console scripts
def _launch(argv, default_config: str, description: str) -> None:
    from nemo_optune.config import RootConfig, conf_dir

    argv = sys.argv[1:] if argv is None else list(argv)
    answer_help(argv, os.path.basename(sys.argv[0]), description, RootConfig, default_config, conf_dir())
    quiet_megatron_warnings()  # before anything imports megatron
    run_main(argv, default_config=default_config)


def train(argv=None) -> None:
    """optune-train, examples/train_optune.py: OPTune / online DPO / offline DPO / HyPO (and SFT with method=sft)."""
    _launch(argv, "optune_tiny", "Run one experiment: the SFT warm start (unless restoring a model), then the method.")


def sft(argv=None) -> None:
    """optune-sft, examples/train_sft.py: the SFT warm start alone (EXP_DIR/sft_checkpoint)."""
    _launch(
        argv, "sft_tiny", "The SFT warm start on its own: writes EXP_DIR/sft_checkpoint for model.restore_from_path."
    )
