"""Experiment configuration: the schema (ppll_ext.config.schema: dataclasses with one docstring per field, their
choices and checks) and its reading from YAML files and `--set` overrides (ppll_ext.config.parse).

Each section is owned by the code that uses it: `ModelConfig` lives in ppll_ext.models and `DataConfig` in
ppll_ext.data (both re-exported here). Every public name of both modules is re-exported here.
"""

from ppll_ext.config.parse import YAML_LIMIT, config_from_dict, load_config, parse_override
from ppll_ext.config.schema import (
    AUTOCAST_MODES,
    DEVICES,
    ENGINES,
    LM_AUX,
    METHODS,
    OPTIMIZERS,
    RUNTIMES,
    SCHEDULES,
    TASK_CHOICES,
    Autocast,
    AuxKind,
    Config,
    DataConfig,
    Device,
    Engine,
    LocalConfig,
    Method,
    ModelConfig,
    OnNan,
    OptimConfig,
    Optimizer,
    Runtime,
    Schedule,
    TaskChoice,
    TrainConfig,
    check_device,
    config_keys,
    validate,
)

__all__ = ["AUTOCAST_MODES", "DEVICES", "ENGINES", "LM_AUX", "METHODS", "OPTIMIZERS", "RUNTIMES", "SCHEDULES",
           "TASK_CHOICES", "YAML_LIMIT", "Autocast", "AuxKind", "Config", "DataConfig", "Device", "Engine",
           "LocalConfig", "Method", "ModelConfig", "OnNan", "OptimConfig", "Optimizer", "Runtime", "Schedule",
           "TaskChoice", "TrainConfig", "check_device", "config_from_dict", "config_keys", "load_config",
           "parse_override", "validate"]
