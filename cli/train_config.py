"""``finetune train --config FILE.yaml``: a run's flags in a YAML file, read through the same parser as the
command line, and the resolved configuration written back in the same form (``OUT/train_config.yaml``,
``--print-config``).

The file is a mapping of flag names without their leading dashes to the values one would type after the flag::

    method: qlora
    lr: 2e-4                # the flag's own type reads the text: 2e-4 is a float here, as on the command line
    min-lr-ratio: 0.1       # the flag's spelling, dashes and all (min_lr_ratio is an unknown key)
    targets: q_proj,v_proj
    grad-checkpointing: true    # a switch: true gives the flag, false leaves it out
    model: null             # null: the recipe's default, as if the key were absent

Each value's text goes through ``argparse`` as ``--key=value``, so the types, choices and ranges are the flags'
own (``cli/train.py``, ``cli/common.py``); flags given on the command line override the file. An unknown key, a
key given twice, a list or mapping where one value belongs, or a value the flag rejects is an error naming the file,
the line (from PyYAML's node marks) and the key. A file that ships with the package (``recipes/*.yaml``) can be
named by its stem: ``--config qlora``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.resources
import re
from pathlib import Path

import yaml

from finetune_ref.cli.common import targets_text
from finetune_ref.recipes.base import RunConfig

CONFIG_FILE = "train_config.yaml"                   # the resolved config, written into --out
# Flags about this invocation, not the run: not keys of a file (by dest). --overwrite stays a choice made on the
# command line each time (nothing is replaced unasked).
NOT_IN_FILE = {"help", "config", "print_config", "overwrite", "extend"}
NOT_WRITTEN = NOT_IN_FILE | {"dry_run", "resume"}   # a repeat starts afresh (a resumed run equals an uninterrupted one)
BOOL_TAG = "tag:yaml.org,2002:bool"
NULL_TAG = "tag:yaml.org,2002:null"
SHOW = {"targets": targets_text, "log": ",".join,   # a field's value -> the flag's text, where str() is not it
        "modules_to_save": ",".join, "trainable_tokens": lambda ids: ",".join(map(str, ids))}
HEADER = ("# finetune train --config this file: the resolved settings of a run, one flag of `finetune train` per\n"
          "# key (without its dashes); null: the default. Flags on the command line override these.\n")


def file_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Key -> flag for every flag a file may set: the long option without its dashes, in --help order."""
    return {opt[2:]: action for action in parser._actions if action.dest not in NOT_IN_FILE
            for opt in action.option_strings if opt.startswith("--")}


def packaged_configs() -> dict[str, Path]:
    """The YAML files that ship in ``finetune_ref.recipes`` (``recipes/*.yaml``), by stem."""
    root = importlib.resources.files("finetune_ref.recipes")
    return {Path(f.name).stem: Path(str(f)) for f in root.iterdir() if f.name.endswith(".yaml")}


def config_path(name: str) -> Path:
    """``--config``'s file: a path, else a packaged config's stem (``qlora``).

    Raises:
        FileNotFoundError: neither, listing the packaged configs.
    """
    path = Path(name)
    if path.is_file():
        return path
    packaged = packaged_configs()
    if name in packaged:
        return packaged[name]
    raise FileNotFoundError(f"--config {name}: no such file, nor one of the configs that ship with finetune-ref "
                            f"({', '.join(sorted(packaged))})")


class ConfigError(ValueError):
    """A bad --config file: the message names the file, line and key."""


def read_config(path: Path, parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, dict[str, tuple]]:
    """Parse a YAML config with ``parser`` (a flags-only parser with ``exit_on_error=False``).

    Returns:
        The namespace of the values the file gives, and dest -> (key, line) for each.

    Raises:
        ConfigError: not YAML, not a mapping, an unknown or repeated key, a value the flag rejects.
    """
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    namespace, origins = argparse.Namespace(), {}
    if root is None:  # an empty file: nothing set
        return namespace, origins
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}, line {root.start_mark.line + 1}: expected 'flag-name: value' lines (a mapping)")
    keys, seen = file_keys(parser), {}
    for key_node, value_node in root.value:
        line, key = key_node.start_mark.line + 1, key_node.value
        where = f"{path}, line {line}: {key}"
        if key in seen:
            raise ConfigError(f"{where}: given twice (first on line {seen[key]})")
        seen[key] = line
        action = keys.get(key)
        if action is None and f"--{key}" in parser._option_string_actions:  # --config, --overwrite, ...
            raise ConfigError(f"{path}, line {line}: {key} is not a key of a file: give --{key} on the command line")
        if action is None:
            raise ConfigError(f"{path}, line {line}: unknown key {key!r}{_suggest(key, keys)}")
        if isinstance(value_node, yaml.ScalarNode) and value_node.tag == NULL_TAG:
            continue
        try:
            tokens = _tokens(key, action, value_node)
            parser.parse_args(tokens, namespace=namespace)
        except (argparse.ArgumentError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"{where}: {getattr(e, 'message', e)}") from None
        if tokens:  # a switch set false gives nothing
            origins[action.dest] = (key, line)
    # only what the file gave (parse_args also fills in the defaults of the few flags that have one)
    return argparse.Namespace(**{dest: getattr(namespace, dest) for dest in origins}), origins


def _tokens(key: str, action: argparse.Action, node) -> list[str]:
    """The command-line words that give ``key`` the value of ``node``."""
    if not isinstance(node, yaml.ScalarNode):
        kind = "list" if isinstance(node, yaml.SequenceNode) else "mapping"
        raise argparse.ArgumentError(None, f"expected one value, got a {kind} (a list of names is one string: "
                                           "q_proj,v_proj)")
    if action.nargs == 0:  # a switch (--grad-checkpointing, --no-double-quant): true gives it
        if node.tag != BOOL_TAG:
            raise argparse.ArgumentError(None, f"expected true or false, got {node.value!r}")
        return [f"--{key}"] if node.value.lower() in ("true", "yes", "on") else []
    return [f"--{key}={node.value}"]  # '=' so that a value starting with '-' is not taken for a flag


def _suggest(key: str, keys: dict) -> str:
    close = difflib.get_close_matches(key.replace("_", "-"), list(keys), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (keys are the flags of `finetune train --help` without the leading dashes)"


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser, build) -> tuple:
    """The command line's ``args`` over the ``--config`` file's values, made into the run's config by ``build``
    (``cli.train.run_config``).

    Returns:
        (the merged namespace, what ``build`` returns for it).

    Raises:
        ConfigError: a bad file, or a value of it the recipe rejects (naming its line and key).
        FileNotFoundError: no such --config.
    """
    if getattr(args, "config", None) is None:
        return args, build(args)
    path = config_path(args.config)
    from_file, origins = read_config(path, parser)
    # The command line wins where it gave a flag (a switch's default False is not one).
    defaults = {a.dest: a.default for a in parser._actions if a.default is not argparse.SUPPRESS}
    typed = {k: v for k, v in vars(args).items() if k not in defaults or v != defaults[k]}
    merged = argparse.Namespace(**{**vars(args), **vars(from_file), **typed})
    try:
        return merged, build(merged)
    except ValueError as e:  # a check across fields or in the recipe: name the line of the field it is about
        message = str(e)
        named = []  # (where the message names it, key, line) of the file's values the command line left alone
        for dest, (key, line) in origins.items():
            found = re.search(rf"(?<![\w-])(--{re.escape(key)}|{dest})(?![\w-])", message)
            if found and dest not in typed:
                named.append((found.start(), key, line))
        if named:  # the first one the message names is what it is about
            _, key, line = min(named)
            raise ConfigError(f"{path}, line {line}: {key}: {message}") from None
        raise ConfigError(f"{path}: {message}") from None


def config_values(cfg: RunConfig, parser: argparse.ArgumentParser) -> dict:
    """The flags that give ``cfg``, as the YAML values of a --config file (key -> value; None: the default)."""
    values = {"method": cfg.method}
    fields = {f.name for f in dataclasses.fields(cfg)}
    for key, action in file_keys(parser).items():
        if action.dest not in fields or action.dest in NOT_WRITTEN:
            continue
        value = getattr(cfg, action.dest)
        if action.nargs == 0:
            values[key] = value == action.const  # the switch is on iff the field holds what the flag sets
        elif value is None or value == ():
            values[key] = None
        else:
            values[key] = SHOW.get(action.dest, lambda v: v)(value)
    return values


def config_text(cfg: RunConfig, parser: argparse.ArgumentParser) -> str:
    """``cfg`` as a --config file that gives it back (``read_config`` of this text builds an equal config)."""
    return HEADER + yaml.safe_dump(config_values(cfg, parser), sort_keys=False, default_flow_style=False)
