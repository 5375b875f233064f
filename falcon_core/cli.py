"""The `falcon` console script: `falcon COMMAND [ARGS...]`.

Each subcommand is registered by name as a `"module:function"` string and imported only when it
runs, so `falcon_core` never imports `deploy`, `pipelines` or `bench` (nor Ray) at import time. The
function's contract is `main(argv: list[str] | None = None) -> int | None`: it receives the arguments
after the subcommand's name, parses them itself (with `prog="falcon NAME"`), and returns an exit code
(None means 0). A subcommand whose module is not installed yet gives a one-line message, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    target: str
    """`"package.module:function"`, imported when the command runs."""
    help: str

    def __post_init__(self) -> None:
        module, _, function = self.target.partition(":")
        if not module or not function:
            raise ValueError(f"command target {self.target!r} is not of the form 'module:function'")


COMMANDS: dict[str, Command] = {
    "generate": Command("falcon_core.generate_cli:main", "generate a reply with the target (and a drafter)"),
    "serve": Command("deploy.cli:main", "serve the OpenAI-compatible API on Ray Serve"),
    "bench": Command("bench.cli:main", "measure speed-up and acceptance against baselines"),
    "distill": Command("pipelines.distill:main", "train a Falcon drafter for a target (CSGD on Ray Train)"),
    "cache": Command("pipelines.cache_hidden_states:main", "cache the target's hidden states (Ray Data)"),
    "convert": Command(
        "falcon_core.cli:convert", "resolve a model spec (converting a GGUF once); print its folder"
    ),
}


def main(argv: Sequence[str] | None = None, commands: Mapping[str, Command] = COMMANDS) -> int:
    """Entry point of the `falcon` script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(commands)
    # Only the first argument is the command; everything after it belongs to the command's own parser.
    args = parser.parse_args(argv[:1])
    function = _load(args.command, commands[args.command])
    if function is None:
        return 2
    result = function(argv[1:])
    return int(result or 0)


def _parser(commands: Mapping[str, Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="falcon",
        description="Falcon semi-autoregressive speculative decoding: distil a drafter, generate, serve, bench.",
        epilog="Run `falcon COMMAND --help` for a command's own options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in commands.items():
        sub.add_parser(name, help=command.help, add_help=False)
    return parser


def _load(name: str, command: Command) -> Callable[[list[str]], int | None] | None:
    """The command's function, or None after printing why it cannot be loaded."""
    module_name, _, function_name = command.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            print(
                f"falcon {name}: not available in this installation (module {module_name!r} is missing)",
                file=sys.stderr,
            )
        else:
            print(
                f"falcon {name}: needs the module {missing!r}, which is not installed "
                f"(run `bash scripts/setup.sh`)",
                file=sys.stderr,
            )
        return None
    function = getattr(module, function_name, None)
    if not callable(function):
        print(f"falcon {name}: {module_name!r} has no function {function_name!r}", file=sys.stderr)
        return None
    return function


def convert(argv: Sequence[str] | None = None) -> int:
    """`falcon convert [SPEC]`: resolve a model spec to a local HF folder and print the folder."""
    from pathlib import Path

    from falcon_core.resolve import DEFAULT_MODEL, ModelNotFoundError, resolve_model

    parser = argparse.ArgumentParser(prog="falcon convert", description=convert.__doc__)
    parser.add_argument(
        "spec",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"alias, local HF folder, .gguf file or hub id (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $FALCON_HOME")
    args = parser.parse_args(argv)
    try:
        folder = resolve_model(args.spec, cache_dir=args.cache_dir)
    except ModelNotFoundError as err:
        print(f"falcon convert: {err}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
