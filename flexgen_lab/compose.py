"""Compose run configurations from conf/ outside the CLI (reproduce, benchmarks, tests).

Hydra reads conf/ at the repository's top level, found from this file, plus the calibrated
profiles' directory on its search path (conf/config.yaml). The result is the same RunConfig
`python -m flexgen_lab run OVERRIDES` would get, converted and with unknown keys refused.

    >>> cfg = compose_run_config(["model=opt-30b", "policy=paper-30b-512"])
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def ensure_user_config_dir() -> None:
    """Hydra searches the calibrated-profiles directory; make it so it never warns."""
    from flexgen_lab.hardware.calibrate import user_config_dir

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
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)} "
                          "(see `python -m flexgen_lab run --cfg job` for the valid keys)")
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


def compose_run_config(overrides: list[str]):
    """The RunConfig `run OVERRIDES` would get (conf/ and calibrated profiles), converted; a
    fresh copy each call (callers may change it).

    A Hydra error (an unknown option, a bad value for the schema) becomes a ConfigError."""
    return copy.deepcopy(_composed(tuple(overrides)))


@functools.lru_cache(maxsize=1024)
def _composed(overrides: tuple[str, ...]):
    """Composing costs about 0.1 s; reproduce asks for the same cells more than once."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from flexgen_lab.config import ConfigError, register_configs

    ensure_user_config_dir()
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        try:
            composed = compose(config_name="config", overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(str(err).splitlines()[0]) from None
        return to_run_config(composed)


def load_profile(name: str):
    """The hardware profile `name` as `run hardware=NAME` would see it."""
    from flexgen_lab.hardware.profile import HardwareProfile

    return HardwareProfile.from_config(compose_run_config([f"hardware={name}"]).hardware)
