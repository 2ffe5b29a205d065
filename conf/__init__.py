"""Config loading: YAML presets and files with ``inherit``, ``key=value`` overrides, typed and validated; the
run-file resolver; atomic file writes (conf.files). The bottom layer: every package may import it, it imports none
of them."""
from conf.files import atomic_write_bytes, atomic_write_text
from conf.loader import (CONF_DIR, PRESET_DIR, RUN_DIR, ConfigError, build_dataclass, cli_errors, config_to_dict,
                         dump_yaml, list_presets, load_config, run_file, split_cli)

__all__ = ["CONF_DIR", "PRESET_DIR", "RUN_DIR", "ConfigError", "atomic_write_bytes", "atomic_write_text",
           "build_dataclass", "cli_errors", "config_to_dict", "dump_yaml", "list_presets", "load_config", "run_file",
           "split_cli"]
