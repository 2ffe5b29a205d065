"""Config loading: YAML presets and files with ``inherit``, ``key=value`` overrides, typed and validated."""
from conf.loader import (CONF_DIR, PRESET_DIR, ConfigError, build_dataclass, cli_errors, config_to_dict, dump_yaml,
                         list_presets, load_config, split_cli)

__all__ = ["CONF_DIR", "PRESET_DIR", "ConfigError", "build_dataclass", "cli_errors", "config_to_dict", "dump_yaml",
           "list_presets", "load_config", "split_cli"]
