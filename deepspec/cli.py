"""`deepspec` console script: subcommand dispatch only.

    deepspec <command> [subcommand] recipe=NAME key=value ... [--cfg job]

Each command is a function `run(cfg) -> summary dict` in its own module, callable from
tests; this file composes the config and hands it to `deepspec.runs.run_command` (checks,
output-directory lock, the call, `summary.json`).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Optional

# (command, subcommand) -> ("module:function", default recipe, one-line help)
COMMANDS: dict[tuple[str, Optional[str]], tuple[str, Optional[str], str]] = {
    ("inspect", None): ("deepspec.targets.inspect:run", "dspark_smollm2",
                        "load the target, render a chat prompt, print its tapped features' shapes"),
    ("data", "prompts"): ("data_tools.commands:prompts", None, "read, clean, de-duplicate, mix and split prompts"),
    ("data", "regenerate"): ("data_tools.commands:regenerate", None, "regenerate assistant turns with the target"),
    ("data", "features"): ("data_tools.commands:features", None, "write the target-feature cache"),
    ("data", "estimate"): ("data_tools.commands:estimate", None, "bytes per token and total size of a cache"),
    ("train", None): ("deepspec.training.train:run", None, "distil a drafter against the frozen target"),
    ("eval", None): ("deepspec.eval.run:run", None, "speculative decoding: tau, acceptance, speedup"),
    ("eval", "profile"): ("deepspec.eval.profile:run", None, "measure SPS(B) of the target on this hardware"),
    ("eval", "calibrate"): ("deepspec.eval.calibrate:run", None, "fit STS temperatures of the confidence head"),
    ("export", None): ("deepspec.export.run:run", "dspark_smollm2", "write a drafter vLLM / SGLang / HF / V4 can load"),
    ("import", None): ("deepspec.export.importers:run", "dspark_smollm2",
                       "a released drafter (V4 mtp.*, DeepSpec HF, speculators) -> a deepspec checkpoint"),
    ("plan", None): ("deepspec.plan:run", None, "capacity plan: parameters, memory per GPU, cache size"),
    ("quickstart", None): ("deepspec.quickstart:run", "quickstart_smollm2",
                           "the whole pipeline on the embedded SmolLM2 target, on CPU"),
}

# packages that implement deepspec interfaces (feature sources, shipped assets): imported before a command
# runs, so that deepspec itself never imports them
PLUGINS = ("data_tools",)

USAGE = """usage: deepspec <command> [subcommand] recipe=NAME [key=value ...] [--cfg job]

commands:
  recipes                      list every recipe with its purpose
{commands}

  --cfg job      print the composed config and exit
  --help         this message
Every command takes output_dir=PATH and writes summary.json there.
"""


def _usage() -> str:
    lines = []
    for (cmd, sub), (_, _, text) in COMMANDS.items():
        name = f"{cmd} {sub}" if sub else cmd
        lines.append(f"  {name:<28} {text}")
    return USAGE.format(commands="\n".join(lines))


def _resolve(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def command_function(cmd: str, sub: Optional[str] = None) -> Callable:
    """The function `deepspec CMD [SUB]` runs, with the plugins it may need loaded."""
    for plugin in PLUGINS:
        importlib.import_module(plugin)
    return _resolve(COMMANDS[(cmd, sub)][0])


def _parse(argv: list[str]) -> tuple[str, Optional[str], list[str], bool, bool]:
    """Split argv into command, subcommand, overrides, print_cfg, help."""
    print_cfg = help_ = False
    words: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--cfg":
            print_cfg = True
            i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("-") and "=" not in argv[i + 1] else 1
            continue
        if a.startswith("--cfg="):
            print_cfg = True
        elif a in ("-h", "--help"):
            help_ = True
        elif a.startswith("--local_rank") or a.startswith("--local-rank"):
            pass  # the deepspeed launcher's argument; LOCAL_RANK comes from the environment
        elif a == "--compare":
            words.append("quickstart.compare=true")
        elif a.startswith("--"):
            raise SystemExit(f"deepspec: unknown option {a}\n\n{_usage()}")
        else:
            words.append(a)
        i += 1
    if not words:
        return "", None, [], print_cfg, True
    cmd, rest = words[0], words[1:]
    sub = None
    if rest and "=" not in rest[0] and (cmd, rest[0]) in COMMANDS:
        sub, rest = rest[0], rest[1:]
    return cmd, sub, rest, print_cfg, help_


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd, sub, overrides, print_cfg, help_ = _parse(argv)
    if cmd == "recipes":
        from deepspec.config import list_recipes

        for name, desc in list_recipes():
            print(f"{name:<22} {desc}")
        return 0
    if help_ and not cmd:
        print(_usage())
        return 0
    if (cmd, sub) not in COMMANDS:
        print(f"deepspec: unknown command '{' '.join(w for w in (cmd, sub) if w)}'\n\n{_usage()}", file=sys.stderr)
        return 2
    if cmd == "import" and overrides and "=" not in overrides[0]:
        overrides = [f"input={overrides[0]}", *overrides[1:]]  # deepspec import SRC output_dir=C
    target, default_recipe, text = COMMANDS[(cmd, sub)]
    if help_:
        print(f"deepspec {cmd}{' ' + sub if sub else ''}: {text}\n")
        print((_resolve(target).__doc__ or "").strip())
        return 0

    from deepspec.config import ConfigError, compose
    from deepspec.guards import redacted_yaml
    from deepspec.runs import run_command

    for plugin in PLUGINS:
        importlib.import_module(plugin)
    try:
        cfg = compose(overrides, default_recipe=default_recipe)
    except ConfigError as exc:
        print(f"deepspec {cmd}: config error: {exc}", file=sys.stderr)
        return 2
    if print_cfg:
        print(redacted_yaml(cfg))
        return 0
    name = f"{cmd} {sub}" if sub else cmd
    try:
        return run_command(name, _resolve(target), cfg)
    except (ValueError, OSError, RuntimeError) as exc:
        if os.environ.get("DEEPSPEC_TRACEBACK"):
            raise
        from deepspec.runs import os_error_message

        text = os_error_message(exc) if isinstance(exc, OSError) and exc.errno is not None else str(exc)
        print(f"deepspec {name}: error: {text}", file=sys.stderr)
        print("(set DEEPSPEC_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
