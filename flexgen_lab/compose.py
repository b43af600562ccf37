"""Compose run configurations from conf/ outside the CLI (reproduce, benchmarks, tests).

Hydra reads conf/ at the repository's top level, found from this file, plus the calibrated
profiles' directory on its search path (conf/config.yaml). The result is the same RunConfig
`python -m flexgen_lab run OVERRIDES` would get, converted and with unknown keys refused.
Errors Hydra or OmegaConf raise while composing become one ConfigError line naming the key,
the value and what is allowed (`describe_hydra_error`), which the CLI exits 2 with.

    >>> cfg = compose_run_config(["model=opt-30b", "policy=paper-30b-512"])
    >>> sweep_jobs(["policy.gpu_batch_size=1,2", "seed=0,1"])   # a --multirun's 4 jobs
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import typing
from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
HYDRA_GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def ensure_user_config_dir() -> None:
    """Hydra searches the calibrated-profiles directory; make it so it never warns."""
    from flexgen_lab.config import user_config_dir

    try:
        (user_config_dir() / "hardware").mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: Hydra then warns once, which is harmless
        pass


def to_run_config(cfg):
    """The composed DictConfig -> a plain RunConfig; keys outside the schema are refused."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from flexgen_lab.config import ConfigError, RunConfig

    unknown = _unknown_keys(OmegaConf.to_container(cfg, resolve=False), RunConfig)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; allowed: the keys "
                          "`python -m flexgen_lab run --cfg job` prints")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0]) from None


def _unknown_keys(data: dict, schema, prefix: str = "") -> list[str]:
    """Keys in `data` that the dataclass `schema` does not declare (e.g. from `+key=value`)."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = []
    for key, value in data.items():
        if key not in fields:
            unknown.append(f"{prefix}{key}")
            continue
        factory = fields[key].default_factory
        child = factory() if callable(factory) else None
        if isinstance(value, dict) and dataclasses.is_dataclass(child):
            unknown += _unknown_keys(value, type(child), f"{prefix}{key}.")
    return unknown


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the configs come from: conf/ (or --config-path), --config-dir, --config-name."""

    config_path: str | None = None
    config_dir: str | None = None
    config_name: str = "config"

    def primary(self) -> str:
        """--config-path is absolute or relative to the CLI's file, as hydra.main has it."""
        if self.config_path is None:
            return CONF_DIR
        return str((Path(__file__).parent / self.config_path).resolve())

    def extra_overrides(self) -> list[str]:
        """--config-dir adds a directory to the search path, before the calibrated profiles."""
        if self.config_dir is None:
            return []
        from flexgen_lab.config import ConfigError, user_config_dir

        extra = Path(self.config_dir).resolve()
        if not extra.is_dir():
            raise ConfigError(f"--config-dir={self.config_dir!r}: not a directory; allowed: "
                              "a directory laid out like conf/")
        return [f"hydra.searchpath=[file://{extra},file://{user_config_dir()}]"]


def compose_run_config(overrides: list[str], source: Source = Source()):
    """The RunConfig `run OVERRIDES` would get (conf/ and calibrated profiles), converted; a
    fresh copy each call (callers may change it).

    A Hydra error (an unknown option, a bad value for the schema) becomes a ConfigError."""
    return copy.deepcopy(_composed(tuple(overrides), source))


@functools.lru_cache(maxsize=1024)
def _composed(overrides: tuple[str, ...], source: Source):
    """Composing costs about 0.1 s; reproduce asks for the same cells more than once."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from flexgen_lab.config import ConfigError, register_configs

    ensure_user_config_dir()
    register_configs()
    with initialize(source):
        try:
            composed = compose(config_name=source.config_name,
                               overrides=[*overrides, *source.extra_overrides()])
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(describe_hydra_error(err, list(overrides))) from None
        return to_run_config(composed)


def sweep_jobs(overrides: list[str], source: Source = Source()) -> list[list[str]]:
    """Every job's overrides in a --multirun over `overrides`, as Hydra's basic sweeper
    makes them (the cartesian product of comma lists, range() and glob())."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # pinned: Hydra < 1.4
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from flexgen_lab.config import ConfigError, register_configs

    ensure_user_config_dir()
    register_configs()
    with initialize(source):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        try:
            return BasicSweeper.split_arguments(parser.parse_overrides(overrides), None)[0]
        except HydraException as err:
            raise ConfigError(describe_hydra_error(err, overrides)) from None


def initialize(source: Source):
    """Hydra's compose API over `source` (a context manager)."""
    from hydra import initialize_config_dir

    return initialize_config_dir(config_dir=source.primary(), version_base="1.3")


def load_profile(name: str):
    """The hardware profile `name` as `run hardware=NAME` would see it."""
    from flexgen_lab.hardware.profile import HardwareProfile

    return HardwareProfile.from_config(compose_run_config([f"hardware={name}"]).hardware)


# --- Hydra's errors as one line: key, value, what is allowed ------------------------------


def describe_hydra_error(err: Exception, overrides: list[str]) -> str:
    """What went wrong composing `overrides`, naming the key, the value and what is allowed
    (Hydra's own text names at most two of the three)."""
    text, cause = str(err), str(err.__cause__ or "")
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], re.M)
        return (f"{group}={option}: no such {group} option; allowed: {', '.join(options)}"
                + (f" (or a file {group}/{option}.yaml under --config-dir)" if options else ""))
    if "Error parsing override" in text or type(err).__name__ == "OverrideParseException":
        bad = _unparsable(overrides)
        return (f"{bad!r}: not an override Hydra can parse ({text.splitlines()[0]}); "
                f"allowed: key=value, group=option, +key=value ({HYDRA_GRAMMAR})")
    edit = re.match(r"Could not (append to|delete from) config\.[^']*'([^']+)'", text)
    if edit:
        key = edit.group(2)
        return (f"{'+' if edit.group(1) == 'append to' else '~'}{key}: "
                + (f"{key} exists already; allowed: {key}=VALUE (without +)"
                   if edit.group(1) == "append to" else
                   f"{key} is not in the config; allowed: ~ on a key or group it has"))
    if text.startswith("Ambiguous value for argument"):
        arg = re.search(r"'(.*)'", text.splitlines()[0])
        return (f"{arg.group(1) if arg else text.splitlines()[0]}: a comma-separated list "
                "sweeps only with --multirun; allowed: one value, [a,b] for a list, or "
                "'a,b' quoted for a string")
    key = _failing_key(text, cause)
    if key is not None:
        value = _value_of(key, overrides)
        if "not in" in cause or "Could not override" in text:
            return (f"{key}={value}: unknown config key; allowed: the keys `python -m "
                    "flexgen_lab run --cfg job` prints (a group is chosen with group=option)")
        return f"{key}={value!r}: allowed: {_expected(key)} ({cause.splitlines()[0]})"
    first = text.splitlines()[0] if text else type(err).__name__
    return f"{first} ({cause.splitlines()[0]})" if cause else first


def _failing_key(text: str, cause: str) -> str | None:
    for pattern, where in ((r"full_key: (\S+)", cause), (r"Could not override '([^']+)'", text),
                           (r"Error merging override ([^=\s]+)=", text)):
        match = re.search(pattern, where)
        if match:
            return match.group(1)
    return None


def _value_of(key: str, overrides: list[str]) -> str:
    for override in reversed(overrides):
        name, _, value = override.partition("=")
        if name.lstrip("+~") == key:
            return value
    return "?"


def _unparsable(overrides: list[str]) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except HydraException:
            return override
    return " ".join(overrides)


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _expected(key: str) -> str:
    """What a key of RunConfig holds, in words (from the dataclasses' annotations)."""
    from flexgen_lab.config import RunConfig

    node: typing.Any = RunConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return "a value of the right type"
        node = typing.get_type_hints(node).get(part)
    if dataclasses.is_dataclass(node):
        first = dataclasses.fields(node)[0].name
        return f"a group of keys, set one by one (e.g. {key}.{first}=...)"
    if typing.get_origin(node) is list:
        return "a list, e.g. [1, 2]"
    args = [a for a in typing.get_args(node) if a is not type(None)]  # X | None
    optional = " or null" if type(None) in typing.get_args(node) else ""
    return _TYPE_WORDS.get(args[0] if args else node, "a value of the right type") + optional
