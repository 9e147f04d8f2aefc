"""What an Olive flag is in orch's tables: Flag (spellings, kind, default, help, the help group it is listed
under) and Command (one command's flags). The tables (shared_flags and the *_flags modules by command family), the
argv grammar (flag_parsing) and the CLI (cli.olive) all read these types; they live apart so that none of those
imports another to get them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# the help groups (rich panels) flags are listed under, as Olive groups them
MODEL = "Model"
DATA = "Data"
TRAIN = "Fine-tuning"
EXPORT = "Export"
QUANT = "Quantization"
ACCEL = "Accelerator"
OUTPUT = "Output and logging"
REMOTE = "Azure ML (Olive 0.7-0.8 remote run)"
OTHER = "Accepted for compatibility"


@dataclass(frozen=True)
class Flag:
    """One Olive flag. kind: str | int | float | flag (store_true) | bool (Olive's type=bool: takes a value) |
    list (nargs * or +: space-separated items) | optional (nargs ?: a value or `const` when given bare)."""

    name: str
    help: str
    kind: str = "str"
    default: Any = None
    short: str | None = None
    group: str = MODEL
    choices: tuple[str, ...] | None = None
    const: str | None = None
    aliases: tuple[str, ...] = ()
    required: bool = False

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    @property
    def spellings(self) -> tuple[str, ...]:
        """--name plus its dash/underscore twin (Olive mixes both: --num-splits, --num_split), short, aliases."""
        twin = "--" + (self.name[2:].replace("_", "-") if "_" in self.name else self.name[2:].replace("-", "_"))
        names = [self.name, *self.aliases]
        if twin not in names:
            names.append(twin)
        return tuple(dict.fromkeys([*names, *([self.short] if self.short else [])]))


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    flags: tuple[Flag, ...]
    extra_args: bool = False  # finetune: other --name value pairs are transformers TrainingArguments
    versions: str = "0.7-0.13"

    def flag(self, dest: str) -> Flag:
        return next(f for f in self.flags if f.dest == dest)
