"""One declaration per setting: name, type, default, help and who may set it; CLI options derive from it."""
from __future__ import annotations

import inspect
from dataclasses import MISSING, Field, field, fields
from typing import Any, Callable, Mapping

from leukfed.common.errors import LeukError

# Who may set a setting: the coordinator (run config, leuk-server), a site (node config, leuk-client)
# or only a simulation (leuk simulate; never read on the deployment path).
WHO = ("coordinator", "site", "simulation")


def setting(default: Any, help: str, who: str = "coordinator", *, flag: str = "", required: bool = False,
            cli: bool = True) -> Any:
    """A dataclass field carrying its help text and owner. `flag` overrides the option's name (a bool
    may give "--on/--off"); `required`: the CLI has no default for it; `cli=False`: set by code only."""
    if who not in WHO:
        raise ValueError(f"who must be one of {WHO}, not {who!r}")
    return field(default=default, metadata={"help": help, "who": who, "flag": flag, "required": required,
                                            "cli": cli})


def inherit(cls, name: str, *, default: Any = MISSING) -> Any:
    """The same setting (default, help, owner) as `cls`'s field `name`, for a schema that repeats it;
    `default` overrides the default only (e.g. a simulation's smaller model), never help or owner."""
    source = next(f for f in fields(cls) if f.name == name)
    if default is MISSING:
        return field(default=source.default, metadata=dict(source.metadata))
    return field(default=default, metadata={**source.metadata, "inherited_default": source.default})


def kebab(name: str) -> str:
    return name.replace("_", "-")


def declared(cls) -> list[Field]:
    """The settings of a schema dataclass (fields that carry help and owner)."""
    return [f for f in fields(cls) if "who" in f.metadata]


def default_of(f: Field) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def option_flags(f: Field) -> tuple[str, ...]:
    """The option name(s) a CLI uses for a setting."""
    flag = f.metadata.get("flag") or ""
    if flag:
        return (flag,)
    name = f"--{kebab(f.name)}"
    if f.type == "bool" and default_of(f) is True:
        return (f"{name}/--no-{kebab(f.name)}",)
    return (name,)


_PYTHON_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def cli_parameters(cls, who: str | tuple[str, ...]) -> list[inspect.Parameter]:
    """Typer options for every CLI setting of `cls` owned by `who`: same default, same help."""
    import typer

    owners = (who,) if isinstance(who, str) else who
    params = []
    for f in declared(cls):
        if f.metadata["who"] not in owners or not f.metadata["cli"]:
            continue
        default = ... if f.metadata["required"] else default_of(f)
        option = typer.Option(default, *option_flags(f), help=f.metadata["help"], show_default=default is not ...)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=_PYTHON_TYPES.get(str(f.type), str)))
    return params


def with_options(command: Callable, extra: list[inspect.Parameter]) -> Callable:
    """`command` with `extra` keyword options added to the signature Typer reads (its own first)."""
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    command.__signature__ = signature.replace(parameters=own + extra)  # type: ignore[attr-defined]
    return command


def from_mapping(cls, mapping: Mapping[str, Any]):
    """Build a settings dataclass from kebab- or snake-case keys, converting scalar types; unknown keys
    are ignored here (`unknown_keys` names them for whoever must refuse them)."""
    kinds = {f.name: str(f.type) for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in mapping.items():
        name = key.replace("-", "_")
        if name not in kinds or name == "extra":
            continue
        kind = kinds[name]
        try:
            if kind == "bool":
                values[name] = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
            elif kind == "int":
                values[name] = int(raw)
            elif kind == "float":
                values[name] = float(raw)
            else:
                values[name] = str(raw)
        except (TypeError, ValueError, OverflowError):
            raise LeukError(f"setting {key!r} must be {kind}, got {raw!r}") from None
    return cls(**values)


def unknown_keys(cls, mapping: Mapping[str, Any]) -> list[str]:
    known = {kebab(f.name) for f in declared(cls)}
    return sorted(k for k in mapping if kebab(k) not in known)
