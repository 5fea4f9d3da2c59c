"""Pydantic models of the playbook format (v1); no I/O."""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, PrivateAttr, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from runbook.actions import ACTIONS, field_name
from runbook.errors import RunbookError
from runbook.fields import (YAML11_BOOLEANS, Duration, Int, Limit, LimitValue, Strict, StrList, _none_as_empty,
                            _no_bool, _none_as_empty_list, bool_hint, parse_duration, parse_limit)

GUARDS = ("creates", "removes", "unless", "only_if")

def _cron_valid(expr: str) -> bool:
    """True for a five-field cron expression croniter accepts (it raises odd errors on odd input)."""
    from croniter import croniter

    if not expr.strip().startswith("@") and len(expr.split()) != 5:
        return False  # croniter also takes 6-7 fields (seconds, years), which the format does not promise
    try:
        return bool(croniter.is_valid(expr))
    except Exception:  # croniter may raise anything on hostile text; invalid is the honest answer
        return False


def slugify(name: str) -> str:
    """Default step id: lower-case words of the name joined by dashes."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "step"


class Blackout(Strict):
    """A date range in which a window never opens (a change freeze)."""

    start: str = Field(description="Start date or date-time (ISO 8601), inclusive.")
    end: str = Field(description="End date or date-time (ISO 8601), inclusive for dates.")
    reason: str | None = None


class Window(Strict):
    """A maintenance window: opens on a cron schedule for a duration, in a timezone."""

    cron: str = Field(description='Opening times, e.g. "0 2 * * SAT".')
    duration: Duration = Field(description="How long the window stays open, e.g. 2h.")
    timezone: str = "UTC"
    blackout: list[Blackout] = Field(default_factory=list)
    schedule: Literal["on-open"] | None = Field(None, description="`on-open`: the scheduler starts the playbook when the window opens.")

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        if not _cron_valid(v):
            raise ValueError(f"invalid cron expression {v!r}: expected five fields, minute hour day-of-month month day-of-week")
        return v

    @field_validator("duration")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("window duration must be positive")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a directory, a too-long name
            raise ValueError(f"unknown timezone {v!r}: expected an IANA name like UTC or Europe/Berlin") from None
        return v


MAX_LOOP_ITEMS = 10_000   # per step and host: a bigger list is almost always a mistake (a whole table, a range)


def _loop_literal(value: Any) -> Any:
    """`loop:` takes a list, a mapping or an expression string; anything else is refused with what to write."""
    if value is None or isinstance(value, (list, dict, str)):
        return value
    shown = (f"the boolean {str(value).lower()}" if isinstance(value, bool) else
             f"the number {value}" if isinstance(value, (int, float)) else f"a {type(value).__name__}")
    raise ValueError(f"expected a list, a mapping, or an expression such as \"{{{{ users }}}}\", got {shown} "
                     "(write a single item as a list: `loop: [x]`)")


# Keys that make a step structural (compose expands them away): exactly one of these, or one action.
STRUCTURAL_KEYS = ("block", "include", "role")
# Keys of a step that is neither an action nor structural (e.g. `flush_handlers: true`): other features
# append their key here; a step with one of them set to a true value needs no action.
ACTIONLESS_KEYS: list[str] = ["flush_handlers"]   # handlers.py: a flush point is no action


#: `delegate_to: controller` (and `on: controller`): the control machine, never an inventory host of that name.
CONTROLLER = "controller"
# An inventory host name as a delegate may spell it: no shell or path metacharacters, no spaces.
_DELEGATE_NAME = re.compile(r"^[A-Za-z0-9_:][A-Za-z0-9_.:-]{0,252}$")


def delegate_name_problem(name: str) -> str | None:
    """Why `name` cannot name a delegate host (shell/path metacharacters, empty, too long), or None."""
    text = name.strip()
    if not text:
        return "`delegate_to` is empty: expected an inventory host name or `controller`"
    if not _DELEGATE_NAME.match(text) or ".." in text:
        shown = text if len(text) <= 60 else text[:59] + "…"
        return (f"`delegate_to` {shown!r} is not a host name: expected an inventory host name (letters, digits, "
                "`.`, `-`, `_`, `:`) or `controller`")
    return None


def action_count_problem(present: list[str]) -> str | None:
    """The complaint about a step declaring these actions, or None when it declares exactly one."""
    if not present:
        return f"step has no action: expected exactly one of {', '.join(action_names())}"
    if len(present) > 1:
        return f"step has {len(present)} actions ({', '.join(present)}): expected exactly one; split it into several steps"
    return None


def _name_or_reuse(schema: dict[str, Any]) -> None:
    """In the JSON Schema, `- role: NAME` and `- include: FILE` need no `name` (the model names them)."""
    schema["required"] = [k for k in schema.get("required", []) if k != "name"]
    if not schema["required"]:
        del schema["required"]
    schema["anyOf"] = [{"required": ["name"]}, {"required": ["role"]}, {"required": ["include"]}]


class StepBase(Strict):
    """One step of a playbook: exactly one action plus conditions, guards and options.

    The action keys (`shell:`, `upload:`, ...) are not listed here: `Step` below is this model plus
    one optional field per registered action, each with the action's own spec type.
    """

    model_config = ConfigDict(json_schema_extra=_name_or_reuse)

    name: str = Field(description="What the step does, in words.")
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Unique id; defaults to a slug of the name.")
    needs: StrList | None = Field(None, description="Ids this step waits for; default: the previous step; [] makes a root.")

    when: str | None = None
    # `register` would shadow ABCMeta.register on the model class, hence the alias.
    register_as: str | None = Field(None, alias="register", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                    description="Name under which later steps of the host see this step's result.")
    sudo: bool | str = Field(False, description="true (root, or the host's become_user), false, or a user name.")
    timeout: Duration | None = None
    retries: Int = Field(0, ge=0)
    delay: Duration = 0.0
    until: str | None = None
    ignore_errors: bool = False
    changed_when: str | bool | None = None
    failed_when: str | bool | None = None
    creates: str | None = None
    removes: str | None = None
    unless: str | None = None
    only_if: str | None = None
    read_only: bool = False
    on: Literal["controller"] | None = Field(None, description="`on: controller` is an alias of `delegate_to: controller`.")
    delegate_to: str | None = Field(None, description="Run the step on this inventory host (or `controller`, the control "
                                    "machine) on behalf of each selected host, with that host's variables; may be a "
                                    "template naming an inventory host.")
    once: bool = False
    tags: Annotated[StrList, BeforeValidator(_none_as_empty_list, json_schema_input_type=str | list[str] | None)] = Field(default_factory=list)
    env: Annotated[dict[str, str], BeforeValidator(_none_as_empty, json_schema_input_type=dict[str, str | int | float | bool] | None)] = Field(default_factory=dict)
    max_duration: Duration | None = Field(None, description="Do not start when the maintenance window closes sooner than this.")
    # Handlers (runbook/handlers.py).
    notify: Annotated[StrList, BeforeValidator(_none_as_empty_list, json_schema_input_type=str | list[str] | None)] = Field(
        default_factory=list, description="Handlers (by name or id) to run once on this host after this step's "
                                          "segment, when this step changed something.")
    flush_handlers: bool = Field(False, description="`true`: a step with only a name (no action) where the handlers "
                                                    "notified so far run, instead of after the last step.")
    # Loops (runbook/engine/loops.py): one task per (step, host) runs every item and reports each.
    loop: Annotated[list[Any] | dict[str, Any] | str | None, BeforeValidator(_loop_literal)] = Field(
        None, description="Run the step once per item: a list, a mapping (items with `key` and `value`), or an "
                          "expression like `users | selectattr('admin')` (as in `when`, `{{ }}` optional).")
    loop_var: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                 description="Name of the current item in templates (default `item`).")
    index_var: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                  description="Name of the current item's position (0, 1, ...) in templates.")
    label: str | None = Field(None, description="How an item is shown in results, plan, console and audit: a template "
                                                "(default: the item, shortened).")
    loop_concurrency: Annotated[int, Field(ge=1), BeforeValidator(_no_bool)] | None = Field(None, description="Items of one host run at once (default 1: in order).")

    vars: Annotated[dict[str, Any], BeforeValidator(_none_as_empty, json_schema_input_type=dict[str, Any] | None)] = Field(
        default_factory=dict, description="Variables of this step (of every step inside, on a block, include or role).")
    include: str | None = Field(None, description="A YAML file holding a list of steps, relative to this file; "
                                                  "its steps are namespaced `ID/step-id`.")
    role: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="A role: `roles/NAME/` beside the "
                             "playbook (or on $RUNBOOK_ROLES_PATH) with steps.yml, defaults.yml, handlers.yml, "
                             "templates/ and files/.")

    _action: str = PrivateAttr("")
    # Set by compose (runbook/compose.py) on the flat steps; read them through its accessors.
    _origin: Any = PrivateAttr(None)              # compose.Origin: the file and document path of the step
    _blocks: tuple = PrivateAttr(())              # ((block id, part), ...) of enclosing blocks, outermost first
    _namespace: str = PrivateAttr("")             # include/role namespace ("" in the playbook itself)
    _search_dirs: tuple = PrivateAttr(())         # directories searched for template/upload sources, first first
    _defaults: dict = PrivateAttr(default_factory=dict)   # role defaults (lowest precedence variables)
    _skip: str = PrivateAttr("")                  # why the run skips it without looking (--start-at-step)
    _own_when: str | None = PrivateAttr("<own>")  # its own `when` when compose and-ed enclosing conditions into it

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        # `- role: nginx` and `- include: x.yml` need no name: they are named after what they bring in.
        if isinstance(data, dict) and "name" not in data and not any(k in data for k in ("block", "rescue", "always")):
            if isinstance(data.get("role"), str):
                return {"name": f"role {data['role']}", **({} if "id" in data else {"id": data["role"]}), **data}
            if isinstance(data.get("include"), str):
                stem = data["include"].replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
                return {"name": f"include {data['include']}", **({} if "id" in data else {"id": slugify(stem)}), **data}
        return data

    @field_validator("sudo", mode="before")
    @classmethod
    def _sudo_unambiguous(cls, v: Any) -> Any:
        # `sudo: yes` would otherwise run as a user named "yes": a YAML 1.1 boolean word is never a user here.
        if isinstance(v, str) and v.strip().lower() in (*YAML11_BOOLEANS, "true", "false"):
            raise PydanticCustomError(
                "sudo_word", "`sudo: {value}` is neither true/false nor a user name", {"value": v,
                "hint": f"{bool_hint(v)}; `sudo: true` runs as root (or the host's become_user), `sudo: USER` as USER"})
        if isinstance(v, (int, float)) and not isinstance(v, bool):   # pydantic would read 0 and 1 as booleans
            raise PydanticCustomError("bool_word", "expected true or false or a string, got {shown}",
                                      {"shown": f"{'an integer' if isinstance(v, int) else 'a number'} {v}",
                                       "hint": "write `sudo: true`, `sudo: false` or `sudo: USER`"})
        return v

    @field_validator("delegate_to")
    @classmethod
    def _delegate_name(cls, v: str | None) -> str | None:
        if v is None or "{" in v:
            return v   # a template: its rendered value is checked when the task runs
        problem = delegate_name_problem(v)
        if problem:
            raise ValueError(problem)
        return v.strip()

    @model_validator(mode="after")
    def _one_delegate(self) -> StepBase:
        if self.on is not None and self.delegate_to is not None:
            raise ValueError("`on: controller` is `delegate_to: controller`: give only one of them")
        if self.delegate is not None and self.structure():
            # Its steps would not inherit it (compose passes on when, tags, sudo and vars): refused, not dropped.
            key = "delegate_to" if self.delegate_to is not None else "on"
            raise ValueError(f"`{key}` on a `{self.structure()[0]}` step does not reach the steps inside it: "
                             "put it on each of those steps")
        return self

    @property
    def delegate(self) -> str | None:
        """Where the step runs instead of its host: `delegate_to` as written, `controller` for `on:`, or None."""
        return self.delegate_to if self.delegate_to is not None else self.on

    @field_validator("env", mode="before")
    @classmethod
    def _env_strings(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: (str(x).lower() if isinstance(x, bool) else str(x) if isinstance(x, (int, float)) else x) for k, x in v.items()}
        return v

    @model_validator(mode="after")
    def _one_action(self) -> StepBase:
        present = self.actions_present()
        structure = self.structure()
        problem = structure_problem(present, structure, self.structural_parts())
        if problem:
            raise ValueError(problem)
        if structure or self.actionless():
            return self
        problem = action_count_problem(present)
        if problem:
            raise ValueError(problem)
        self._action = present[0]
        return self

    def actions_present(self) -> list[str]:
        """Names of the actions this step declares (valid steps have exactly one)."""
        return [a for a in action_names() if (v := getattr(self, field_name(a), None)) is not None
                and not (a in STRUCTURAL_KEYS and isinstance(v, list))]

    def structure(self) -> list[str]:
        """The structural keys this step uses (`block` with a list of steps, `include`, `role`)."""
        return [k for k in STRUCTURAL_KEYS if isinstance(getattr(self, k, None), str if k != "block" else list)]

    def structural_parts(self) -> list[str]:
        """`rescue` and `always`, when given."""
        return [k for k in ("rescue", "always") if getattr(self, k, None) is not None]

    def actionless(self) -> bool:
        """True for a step that needs no action (one of ACTIONLESS_KEYS is set)."""
        return any(getattr(self, k, None) for k in ACTIONLESS_KEYS)

    @property
    def action(self) -> str:
        """The name of this step's action."""
        return self._action or self.actions_present()[0]

    @property
    def action_spec(self) -> Any:
        """The value of this step's action key."""
        return getattr(self, field_name(self.action))

    @property
    def step_id(self) -> str:
        """The explicit id, or the slug of the name."""
        return self.id or slugify(self.name)

    @property
    def loop_name(self) -> str:
        """The name the current loop item has in templates (`loop_var`, default `item`)."""
        return self.loop_var or "item"

    @property
    def guards(self) -> dict[str, str]:
        """The guards this step declares."""
        return {g: getattr(self, g) for g in GUARDS if getattr(self, g) is not None}


def action_names() -> list[str]:
    """The registered actions: built-ins first, then plugins."""
    return ACTIONS.names()


def structure_problem(present: list[str], structure: list[str], parts: list[str]) -> str | None:
    """The complaint about a misused `block`/`include`/`role`/`rescue`/`always`, or None."""
    if parts and structure != ["block"]:
        return (f"`{parts[0]}` belongs to a `block:` step: this step has no `block:` list"
                if not structure else f"`{parts[0]}` belongs to a `block:` step, not to `{structure[0]}`")
    if len(structure) > 1:
        return f"step has {' and '.join(f'`{k}`' for k in structure)}: expected exactly one; split it into several steps"
    if structure and present:
        return f"a `{structure[0]}` step cannot also have an action (`{present[0]}`): put the action in a step of its own"
    return None


def _step_model() -> type[StepBase]:
    """StepBase plus one optional field per registered action (its key, spec type and summary)."""
    fields: dict[str, Any] = {}
    for name, cls in ACTIONS.all().items():
        attr = field_name(name)
        if attr in StepBase.model_fields or name in ("register", "rescue", "always"):
            raise RunbookError(f"action `{name}` has the name of a step key", hint="rename the action plugin")
        spec: Any = cls.spec_type
        if name in STRUCTURAL_KEYS:
            # `block:` with a list is a group of steps; with a mapping it is the action of that name.
            spec = list["Step"] | spec
            summary = f"A list of steps run as a group (with `rescue:`/`always:`), or, as a mapping: {cls.summary()}"
        else:
            summary = cls.summary()
        fields[attr] = (spec | None, Field(None, alias=name if attr != name else None, description=summary))
    for part, text in (("rescue", "Steps run on the hosts where a step of the `block:` failed."),
                       ("always", "Steps run after the `block:` (and `rescue:`) whatever happened.")):
        fields[part] = (list["Step"] | None, Field(None, description=text))
    model = create_model("Step", __base__=StepBase, __module__=__name__, **fields)
    model.model_rebuild(_types_namespace={"Step": model})
    return model


if TYPE_CHECKING:
    Step = StepBase
else:
    Step = _step_model()


class Playbook(Strict):
    """A runbook: metadata, targets, execution limits and steps."""

    runbook: str = Field(description="The playbook's name.")
    description: str | None = None
    hosts: str = Field("all", description="Inventory host pattern, e.g. web:&prod.")
    vars: Annotated[dict[str, Any], BeforeValidator(_none_as_empty, json_schema_input_type=dict[str, Any] | None)] = Field(default_factory=dict)
    secrets: Annotated[dict[str, Annotated[str, Field(pattern=r"^(env|file):.+$")]], BeforeValidator(_none_as_empty)] = Field(
        default_factory=dict, description="NAME: env:VAR or file:PATH; values are redacted everywhere.")
    concurrency: Int = Field(10, ge=1, description="Hosts at once.")
    batch: LimitValue | None = Field(None, description="Rolling batch size: an integer or a percentage.")
    max_failures: LimitValue | None = Field(None, description="Failed hosts tolerated before no new host or batch starts.")
    window: Window | str | None = Field(None, description="A maintenance window, or the name of one in windows.yml.")
    schedule: str | None = Field(None, description="Cron expression for the scheduler, or `on-open`.")
    host_key_checking: Literal["strict", "accept-new", "off"] | None = None
    facts: bool = Field(False, description="Gather each host's facts (read-only, one round trip) before its first "
                                           "step; without it they are gathered when a template first reads `facts`.")
    vars_files: Annotated[StrList, BeforeValidator(_none_as_empty_list, json_schema_input_type=str | list[str] | None)] = Field(
        default_factory=list, description="YAML files of variables (paths relative to the playbook, may use `vars:`); "
                                          "later files win, and all win over `vars:`.")
    steps: Annotated[list[Step], Field(min_length=1)]
    on_failure: Annotated[list[Step], BeforeValidator(_none_as_empty_list, json_schema_input_type=list[Step] | None)] = Field(default_factory=list)
    handlers: Annotated[list[Step], BeforeValidator(_none_as_empty_list, json_schema_input_type=list[Step] | None)] = Field(
        default_factory=list, description="Steps that run once per host after the steps that `notify` them, only "
                                          "when one of those changed something; in the order listed here.")

    # Where the playbook came from: path and node positions (set by the loader, not part of the format).
    _source: Any = PrivateAttr(None)
    # Set by compose: the blocks, includes and roles the flat steps came from (compose.Group by id), and
    # the text of every file read besides the playbook (path -> text), which a plan keeps.
    _groups: dict = PrivateAttr(default_factory=dict)
    _units: dict = PrivateAttr(default_factory=dict)    # section -> its top-level unit ids (steps and groups)
    _files: dict = PrivateAttr(default_factory=dict)
    # On a cluster worker: (step id, source path) -> the copy of the controller's file (cluster/sources.py).
    _shipped: dict = PrivateAttr(default_factory=dict)

    @field_validator("batch")
    @classmethod
    def _batch_positive(cls, v: Limit | None) -> Limit | None:
        if v is not None and v.value <= 0:
            raise ValueError("batch must be at least 1 host or more than 0%")
        return v

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: str | None) -> str | None:
        if v is not None and v != "on-open" and not _cron_valid(v):
            raise ValueError(f"invalid schedule {v!r}: expected a cron expression or `on-open`")
        return v

    def all_steps(self) -> list[Step]:
        """Every action step: main steps (flush points are none), on_failure steps, then handlers."""
        return [*(s for s in self.steps if not s.flush_handlers), *self.on_failure, *self.handlers]

    def step(self, step_id: str) -> Step:
        """The step with this id (main or on_failure), or the handler a handler task id (`handler:ID`) names."""
        from runbook.handlers import handler_id_of

        handler = handler_id_of(step_id)
        for s in self.handlers if handler is not None else self.all_steps():
            if s.step_id == (handler if handler is not None else step_id):
                return s
        raise KeyError(step_id)


__all__ = ["ACTIONLESS_KEYS", "ACTIONS", "CONTROLLER", "GUARDS", "STRUCTURAL_KEYS", "Blackout", "Limit", "Playbook", "Step", "StepBase", "Window", "action_count_problem",
           "action_names", "delegate_name_problem", "parse_duration", "parse_limit", "slugify", "structure_problem"]
