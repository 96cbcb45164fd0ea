"""Typed configuration: one frozen dataclass per role, nested under `Config`.

Every field carries its documentation in `metadata["help"]`; the command line (`--help`),
the README/CONFIG.md table and the validation messages are generated from it, so docs and
flags cannot drift. Load order: dataclass defaults <- YAML preset (`--config`) <- dotted
command-line overrides (`--learner.beta 0.1`). A bad value fails at start with a
`ConfigError` naming the dotted field. The sections are the settings the engines take;
there is no second settings class per role.

Usage in a pipeline:
    cfg = parse_args(sys.argv[1:], description=__doc__)

Modules, by role: `fields` (opt, ConfigError, checks), `sections` (the dataclasses),
`loading` (dict/YAML -> Config), `cli` (argparse, docs/CONFIG.md); every public name is
re-exported here.
"""

from mmalign.config.cli import build_parser, config_doc, iter_fields, markdown_table, parse_args
from mmalign.config.fields import ConfigError, opt, parse_resources
from mmalign.config.loading import (
    EMBEDDED_PRESET,
    from_dict,
    load,
    load_yaml,
    set_dotted,
    to_dict,
)
from mmalign.config.sections import (
    AutoCheckConfig,
    BDHSConfig,
    Config,
    DataConfig,
    JudgeConfig,
    LearnerConfig,
    PipelineConfig,
    SamplerConfig,
    StorageConfig,
    check_bdhs_engine,
)

__all__ = [
    "EMBEDDED_PRESET",
    "AutoCheckConfig",
    "BDHSConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "JudgeConfig",
    "LearnerConfig",
    "PipelineConfig",
    "SamplerConfig",
    "StorageConfig",
    "build_parser",
    "check_bdhs_engine",
    "config_doc",
    "from_dict",
    "iter_fields",
    "load",
    "load_yaml",
    "markdown_table",
    "opt",
    "parse_args",
    "parse_resources",
    "set_dotted",
    "to_dict",
]
