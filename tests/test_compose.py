"""Compose: blocks, includes, roles and vars_files expand into flat steps that know where they came from."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from runbook import compose, run
from runbook.errors import PlaybookError, ValidationError
from runbook.graph import StepGraph
from runbook.loader import load_playbook, parse_playbook, validate_playbook
from runbook.model import Playbook
from runbook.results import Status
from tests.helpers import InventoryWriter

FIXTURES = Path(__file__).parent / "fixtures" / "compose"


def write(root: Path, files: dict[str, Any]) -> Path:
    """Write YAML (or text) files under root; return root / the first file."""
    first = None
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
        first = first or path
    assert first is not None
    return first


def problems(path: Path) -> list[str]:
    """Every error of validating a playbook, rendered (file:line:col: error: message + hint)."""
    report = validate_playbook(path)
    return [p.render() for p in report.errors]


def line_of(path: Path, text: str, nth: int = 1) -> int:
    """The 1-based line of the nth line of a file containing `text`."""
    hits = [i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line]
    return hits[nth - 1]


def one_error(path: Path, *needles: str) -> str:
    found = [p for p in problems(path) if all(n in p for n in needles)]
    assert found, f"no error with {needles}: {problems(path)}"
    return found[0]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A copy of the fixture site (a role, an include, vars_files) to change freely."""
    shutil.copytree(FIXTURES / "site", tmp_path / "site")
    return tmp_path / "site" / "site.yml"


# --- plain playbooks stay as they were ------------------------------------------------------------

def test_a_playbook_without_new_keys_composes_to_itself() -> None:
    text = "runbook: t\nsteps:\n  - name: one\n    shell: 'true'\n  - name: two\n    id: second\n    shell: 'true'\n"
    pb = parse_playbook(text, "pb.yml")
    assert [s.step_id for s in pb.steps] == ["one", "second"]
    assert compose.groups(pb) == {} and not compose.has_structure(pb)
    assert [str(compose.locate(pb, s)) for s in pb.steps] == ["pb.yml:3:5", "pb.yml:5:5"]
    assert list(StepGraph.build(pb).graph.edges(data=True)) == [("one", "second", {})]


# --- blocks ------------------------------------------------------------------------------------------

BLOCK = """\
runbook: t
steps:
  - name: first
    shell: 'true'
  - name: deploy
    when: ready
    tags: [web]
    sudo: true
    vars: {a: 1, b: 2}
    block:
      - name: inner
        shell: 'true'
      - name: own
        when: a == 1
        sudo: false
        tags: [db]
        vars: {b: 3}
        shell: 'true'
    rescue:
      - name: fix
        shell: 'true'
    always:
      - name: tidy
        shell: 'true'
  - name: last
    shell: 'true'
"""


def test_block_keys_are_inherited_by_every_step_inside() -> None:
    pb = parse_playbook(BLOCK, "pb.yml")
    steps = {s.step_id: s for s in pb.steps}
    assert list(steps) == ["first", "inner", "own", "fix", "tidy", "last"]
    assert steps["inner"].when == "ready" and steps["inner"].sudo is True and steps["inner"].tags == ["web"]
    assert steps["own"].when == "(ready) and (a == 1)"
    assert steps["own"].sudo is False                                   # inner wins
    assert steps["own"].tags == ["db", "web"]                           # union
    assert steps["own"].vars == {"a": 1, "b": 3} and steps["fix"].vars == {"a": 1, "b": 2}
    assert steps["first"].when is None and steps["last"].vars == {}
    assert compose.enclosing_blocks(steps["fix"]) == ("deploy",)
    assert compose.rescue_of(steps["fix"]) == ("deploy",) and compose.rescue_of(steps["inner"]) == ()
    assert str(compose.locate(pb, steps["own"], "when")) == "pb.yml:14:15"


def test_block_edges_settle_into_rescue_and_always_and_gate_what_follows() -> None:
    graph = StepGraph.build(parse_playbook(BLOCK, "pb.yml")).graph
    assert graph.has_edge("first", "inner") and not graph.edges["inner", "own"].get("settled")
    for a, b in [("inner", "fix"), ("own", "fix"), ("own", "tidy"), ("fix", "tidy"), ("tidy", "last")]:
        assert graph.edges[a, b].get("settled"), (a, b)
    assert graph.nodes["last"]["gates"] == ("deploy",)
    assert "gates" not in graph.nodes["inner"]


def test_a_block_without_rescue_or_always_is_a_plain_group() -> None:
    text = BLOCK.split("    rescue:")[0] + "  - name: last\n    shell: 'true'\n"
    graph = StepGraph.build(parse_playbook(text, "pb.yml")).graph
    assert graph.has_edge("own", "last") and not graph.edges["own", "last"].get("settled")
    assert "gates" not in graph.nodes["last"]


def test_nested_blocks_and_needs_on_a_block(tmp_path: Path) -> None:
    pb = write(tmp_path, {"pb.yml": {"runbook": "t", "steps": [
        {"name": "outer", "block": [
            {"name": "inner", "block": [{"name": "a", "shell": "true"}, {"name": "b", "shell": "true"}]},
            {"name": "c", "shell": "true"}]},
        {"name": "d", "needs": ["inner"], "shell": "true"},
        {"name": "e", "needs": [], "shell": "true"}]}})
    loaded = load_playbook(pb)
    steps = {s.step_id: s for s in loaded.steps}
    assert compose.enclosing_blocks(steps["a"]) == ("outer", "inner")
    graph = StepGraph.build(loaded).graph
    assert set(graph.predecessors("d")) == {"b"}          # waits for the last step of `inner`
    assert set(graph.predecessors("e")) == set()


@pytest.mark.parametrize("step, needle, key", [
    ({"name": "x", "rescue": [{"name": "r", "shell": "true"}], "shell": "true"}, "`rescue` belongs to a `block:` step", "rescue:"),
    ({"name": "x", "always": [{"name": "r", "shell": "true"}], "role": "web"}, "`always` belongs to a `block:` step, not to `role`", "always:"),
    ({"name": "x", "block": [{"name": "r", "shell": "true"}], "shell": "true"}, "cannot also have an action (`shell`)", "shell: 'true'"),
    ({"name": "x", "block": [{"name": "r", "shell": "true"}], "include": "a.yml"}, "`block` and `include`", "- name: x"),
    ({"name": "x", "block": []}, "`block` is empty", "block: []"),
])
def test_misused_structure_is_a_located_error(tmp_path: Path, step: dict, needle: str, key: str) -> None:
    pb = write(tmp_path, {"pb.yml": {"runbook": "t", "steps": [step]}})
    nth = 2 if key == "shell: 'true'" else 1   # the block's own `shell:` comes after its inner step's
    assert one_error(pb, needle).startswith(f"{pb}:{line_of(pb, key, nth)}:")


def test_rescue_in_on_failure_is_refused(tmp_path: Path) -> None:
    pb = write(tmp_path, {"pb.yml": {"runbook": "t", "steps": [{"name": "s", "shell": "true"}], "on_failure": [
        {"name": "b", "block": [{"name": "x", "shell": "true"}], "rescue": [{"name": "y", "shell": "true"}]}]}})
    assert "ignore_errors" in one_error(pb, "`rescue` is for blocks in `steps`")


def test_an_invalid_step_inside_a_block_is_located_there(tmp_path: Path) -> None:
    pb = write(tmp_path, {"pb.yml": "runbook: t\nsteps:\n  - name: b\n    block:\n      - name: x\n        shel: 'true'\n"})
    assert one_error(pb, "unknown key `shel`").startswith(f"{pb}:6:9")
    assert "did you mean `shell`?" in one_error(pb, "unknown key `shel`")


def test_the_block_action_is_still_a_mapping(tmp_path: Path) -> None:
    pb = write(tmp_path, {"pb.yml": {"runbook": "t", "steps": [
        {"name": "managed", "block": {"path": "/tmp/x", "block": "line"}}]}})
    loaded = load_playbook(pb)
    assert loaded.steps[0].action == "block" and not compose.has_structure(loaded)


def test_duplicate_ids_inside_blocks_are_located(tmp_path: Path) -> None:
    pb = write(tmp_path, {"pb.yml": {"runbook": "t", "steps": [
        {"name": "one", "shell": "true"}, {"name": "b", "block": [{"name": "one", "shell": "true"}]}]}})
    assert one_error(pb, "duplicate step id `one`").startswith(f"{pb}:{line_of(pb, 'name: one', 2)}:")


# --- includes and roles --------------------------------------------------------------------------------

def test_site_fixture_composes_roles_includes_and_vars_files() -> None:
    pb = load_playbook(FIXTURES / "site" / "site.yml")
    steps = {s.step_id: s for s in pb.steps}
    assert list(steps) == ["prepare", "web/page", "web/motd", "check/look", "check/report"]
    assert pb.vars["greeting"] == "hello" and pb.vars["env_note"] == "production"   # later vars_files win
    page = steps["web/page"]
    assert compose.namespace(page) == "web/" and compose.role_defaults(page) == {"port": 80, "title": "Default title"}
    assert page.vars == {"port": 8080}
    assert compose.search_dirs(page)[0].endswith("roles/web/templates")
    assert str(compose.locate(pb, page)).endswith("roles/web/steps.yml:1:3")
    assert [h.step_id for h in pb.handlers] == ["web/reload"]
    assert compose.groups(pb)["web"].kind == "role" and compose.groups(pb)["check"].kind == "include"
    graph = StepGraph.build(pb).graph
    assert set(graph.predecessors("check/report")) >= {"check/look"}
    assert set(graph.predecessors("check/look")) == {"web/motd"}            # after the role's last step
    assert str(compose.resolve_source(pb, page, "index.html.j2")).endswith("roles/web/templates/index.html.j2")
    assert str(compose.resolve_source(pb, steps["web/motd"], "motd")).endswith("roles/web/files/motd")
    files = set(pb._files)
    for rel in ("vars/common.yml", "vars/prod.yml", "tasks/check.yml", "roles/web/steps.yml",
                "roles/web/defaults.yml", "roles/web/handlers.yml"):
        assert str((FIXTURES / "site" / rel).resolve()) in files, rel


def test_needs_inside_an_include_name_ids_of_that_file(tmp_path: Path) -> None:
    pb = write(tmp_path, {"pb.yml": {"runbook": "t", "steps": [
        {"name": "look", "shell": "true"},
        {"include": "inc.yml", "id": "two"},
        {"name": "after", "needs": ["two"], "shell": "true"}]},
        "inc.yml": [{"name": "look", "shell": "true"}, {"name": "b", "needs": ["look"], "shell": "true"},
                    {"name": "c", "needs": ["nope"], "shell": "true"}]})
    err = one_error(pb, "needs unknown step `nope`")
    assert err.startswith(f"{tmp_path / 'inc.yml'}:{line_of(tmp_path / 'inc.yml', '- nope')}:")
    (tmp_path / "inc.yml").write_text(yaml.safe_dump([{"name": "look", "shell": "true"},
                                                     {"name": "b", "needs": ["look"], "shell": "true"}]))
    graph = StepGraph.build(load_playbook(pb)).graph
    assert set(graph.predecessors("two/b")) == {"two/look", "look"}   # its own `look`, and the include's entry
    assert set(graph.predecessors("after")) == {"two/b"}


def test_include_errors_are_located_at_the_include_and_name_the_chain(tmp_path: Path) -> None:
    pb = write(tmp_path, {"pb.yml": {"runbook": "t", "steps": [{"include": "a.yml"}, {"include": "missing.yml"}]},
                          "a.yml": [{"include": "sub/b.yml"}], "sub/b.yml": [{"include": "../a.yml"}]})
    cycle = one_error(pb, "include cycle")
    assert cycle.startswith(f"{tmp_path / 'sub' / 'b.yml'}:1:12") and "a.yml -> sub/b.yml -> a.yml" in cycle
    assert one_error(pb, "not found").startswith(f"{pb}:4:")


def test_an_error_inside_an_included_file_says_where_it_was_included(tmp_path: Path) -> None:
    pb = write(tmp_path, {"pb.yml": {"runbook": "t", "steps": [{"name": "s", "shell": "true"}, {"include": "a.yml"}]},
                          "a.yml": [{"name": "x", "shel": "true"}]})
    err = one_error(pb, "unknown key `shel`")
    assert err.startswith(f"{tmp_path / 'a.yml'}:{line_of(tmp_path / 'a.yml', 'shel:')}:")
    assert f"included from {pb}:{line_of(pb, 'include: a.yml')}" in err


def test_include_file_must_be_a_list_and_a_plain_path(tmp_path: Path) -> None:
    pb = write(tmp_path, {"pb.yml": {"runbook": "t", "steps": [{"include": "a.yml"}, {"include": "{{ x }}.yml", "id": "t"}]},
                          "a.yml": {"name": "x", "shell": "true"}})
    assert "must be a list of steps" in one_error(pb, "a.yml")
    assert "plain path" in one_error(pb, "`include`")


def test_same_role_twice_needs_distinct_ids(site: Path) -> None:
    doc = yaml.safe_load(site.read_text())
    doc["steps"].append({"role": "web"})
    site.write_text(yaml.safe_dump(doc))
    assert "explicit, unique `id:`" in one_error(site, "duplicate id `web`")
    doc["steps"][-1]["id"] = "web2"
    site.write_text(yaml.safe_dump(doc))
    ids = [s.step_id for s in load_playbook(site).steps]
    assert "web2/page" in ids and "web/page" in ids


def test_roles_path_and_missing_roles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pb = write(tmp_path, {"pb.yml": {"runbook": "t", "steps": [{"role": "shared"}]}})
    err = one_error(pb, "role `shared` not found")
    assert "RUNBOOK_ROLES_PATH" in err and err.startswith(f"{pb}:3:")
    write(tmp_path / "elsewhere", {"shared/steps.yml": [{"name": "s", "shell": "true"}]})
    monkeypatch.setenv("RUNBOOK_ROLES_PATH", f"/nonexistent:{tmp_path / 'elsewhere'}")
    assert [s.step_id for s in load_playbook(pb).steps] == ["shared/s"]


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", "/abs"])
def test_role_names_cannot_be_paths(tmp_path: Path, name: str) -> None:
    pb = write(tmp_path, {"pb.yml": {"runbook": "t", "steps": [{"role": name, "name": "r", "id": "r"}]}})
    assert problems(pb), name
    assert any("role" in p for p in problems(pb))


def test_an_include_inside_a_role_must_stay_in_the_role(tmp_path: Path) -> None:
    write(tmp_path, {"outside.yml": [{"name": "x", "shell": "true"}]})
    pb = write(tmp_path, {"pb.yml": {"runbook": "t", "steps": [{"role": "r"}]},
                          "roles/r/steps.yml": [{"include": "../../outside.yml"}]})
    assert one_error(pb, "leaves the role's directory").startswith(f"{tmp_path / 'roles/r/steps.yml'}:1:")
    # The playbook author's own include may go anywhere.
    (tmp_path / "roles/r/steps.yml").write_text(yaml.safe_dump([{"include": "inner.yml"}]))
    write(tmp_path, {"roles/r/inner.yml": [{"name": "y", "shell": "true"}]})
    pb.write_text(yaml.safe_dump({"runbook": "t", "steps": [{"role": "r"}, {"include": "outside.yml"}]}))
    assert [s.step_id for s in load_playbook(pb).steps] == ["r/inner/y", "outside/x"]


def test_include_bombs_stop_at_the_limits(tmp_path: Path) -> None:
    files: dict[str, Any] = {"pb.yml": {"runbook": "t", "steps": [{"include": "l0.yml"}]}}
    for i in range(14):   # each level includes the next twice: 2**14 steps
        files[f"l{i}.yml"] = [{"include": f"l{i + 1}.yml", "id": "a"}, {"include": f"l{i + 1}.yml", "id": "b"}]
    files["l14.yml"] = [{"name": "s", "shell": "true"}]
    pb = write(tmp_path, files)
    assert one_error(pb, f"more than {compose.MAX_STEPS} steps")
    deep: dict[str, Any] = {"pb.yml": {"runbook": "t", "steps": [{"include": "d0.yml"}]}}
    for i in range(compose.MAX_INCLUDE_DEPTH + 2):
        deep[f"d{i}.yml"] = [{"include": f"d{i + 1}.yml"}]
    deep[f"d{compose.MAX_INCLUDE_DEPTH + 2}.yml"] = [{"name": "s", "shell": "true"}]
    pb = write(tmp_path / "deep", deep)
    assert one_error(pb, "nested more than")


# --- vars_files --------------------------------------------------------------------------------------

def test_vars_files_win_over_vars_and_may_use_them(tmp_path: Path) -> None:
    pb = write(tmp_path, {"pb.yml": {"runbook": "t", "vars": {"env": "stage", "a": 1, "b": 1},
                                      "vars_files": ["common.yml", "{{ env }}.yml"], "steps": [{"name": "s", "shell": "true"}]},
                          "common.yml": {"a": 2, "b": 2}, "stage.yml": {"b": 3}})
    assert load_playbook(pb).vars == {"env": "stage", "a": 2, "b": 3}


def test_vars_files_problems_are_located(tmp_path: Path) -> None:
    pb = write(tmp_path, {"pb.yml": "runbook: t\nvars_files:\n  - nope.yml\n  - '{{ unknown }}.yml'\n  - list.yml\n"
                                    "steps:\n  - name: s\n    shell: 'true'\n",
                          "list.yml": "- 1\n"})
    assert one_error(pb, "not found").startswith(f"{pb}:3:5")
    assert "playbook's `vars:` only" in one_error(pb, "vars file path")
    assert one_error(pb, "must be a mapping").startswith(f"{tmp_path / 'list.yml'}:1:")


# --- renderings and listing ----------------------------------------------------------------------------

def test_graph_renders_groups_as_clusters() -> None:
    steps = StepGraph.build(parse_playbook(BLOCK, "pb.yml"))
    dot = steps.to_dot()
    assert 'subgraph "cluster_deploy" { label="block deploy";' in dot
    assert 'subgraph "cluster_deploy/rescue" { label="rescue"; style=dashed;' in dot
    assert '"own" -> "fix" [style=dashed];' in dot
    mermaid = steps.to_mermaid()
    assert 'subgraph g0["block deploy"]' in mermaid and 'subgraph g0_always["always"]' in mermaid
    text = steps.to_text()
    assert "structure\n  first [shell]\n  block deploy\n    inner [shell]\n    own [shell]\n    rescue\n      fix [shell]" in text


def test_cluster_labels_cannot_break_out_of_dot_or_mermaid(tmp_path: Path) -> None:
    pb = write(tmp_path, {"pb.yml": {"runbook": "t", "steps": [
        {"name": 'x"]; evil [label="', "id": "b", "block": [{"name": "s", "shell": "true"}]}]}})
    steps = StepGraph.build(load_playbook(pb))
    assert 'label="block b: x\\"]; evil [label=\\""' in steps.to_dot()
    assert 'subgraph g0["block b: x#quot;]; evil [label=#quot;"]' in steps.to_mermaid()


def test_step_listing_shows_the_expanded_steps_in_order() -> None:
    rows = compose.step_listing(load_playbook(FIXTURES / "site" / "site.yml"))
    assert [(r["section"], r["id"], r["action"], r["block"]) for r in rows] == [
        ("steps", "prepare", "file", ""), ("steps", "web/page", "template", "web"), ("steps", "web/motd", "upload", "web"),
        ("steps", "check/look", "shell", "check"), ("steps", "check/report", "line", "check"),
        ("handlers", "web/reload", "line", "")]
    blocks = compose.step_listing(parse_playbook(BLOCK, "pb.yml"))
    assert [r["block"] for r in blocks] == ["", "deploy", "deploy", "deploy:rescue", "deploy:always", ""]


def test_cli_list_steps_connects_to_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    from runbook.cli import main

    code = main(["run", str(FIXTURES / "site" / "site.yml"), "--list-steps", "-i", "unreachable.invalid,"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0] == "steps:" and "web/page" in out and "template" in out
    assert main(["plan", str(FIXTURES / "site" / "site.yml"), "--list-steps", "--format", "json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)][:2] == ["prepare", "web/page"]


# --- --start-at-step -------------------------------------------------------------------------------------

def test_start_at_step_skips_what_it_depends_on(tmp_path: Path, local_inventory: InventoryWriter) -> None:
    pb = write(tmp_path, {"pb.yml": {"runbook": "t", "steps": [
        {"name": "one", "shell": "echo one >> {{ dir }}/log"},
        {"name": "two", "shell": "echo two >> {{ dir }}/log"},
        {"name": "side", "needs": [], "shell": "echo side >> {{ dir }}/log"},
        {"name": "three", "needs": ["two"], "shell": "echo three >> {{ dir }}/log"}]}})
    inv = local_inventory(["a"])
    result = run(pb, str(inv), audit_log=str(tmp_path / "audit.jsonl"), state_dir=str(tmp_path / "runs"),
                 start_at_step="three")
    assert sorted((tmp_path / "hosts" / "a" / "log").read_text().split()) == ["side", "three"]
    for sid in ("one", "two"):
        r = result.get("a", sid)
        assert r is not None and r.status == Status.SKIPPED and r.message == "before --start-at-step three"
    assert result.exit_code() == 0
    # by name works too, and the loaded playbook object is not changed
    loaded = load_playbook(pb)
    run(loaded, str(inv), audit=False, state_dir=str(tmp_path / "runs"), start_at_step="two")
    assert all(not s._skip for s in loaded.steps)


def test_start_at_step_unknown_is_an_error_with_a_hint(tmp_path: Path, local_inventory: InventoryWriter) -> None:
    pb = write(tmp_path, {"pb.yml": {"runbook": "t", "steps": [{"name": "deploy app", "shell": "true"}]}})
    with pytest.raises(ValidationError) as exc:
        run(pb, str(local_inventory(["a"])), audit=False, start_at_step="deploy-ap")
    assert "did you mean `deploy-app`?" in str(exc.value)


def test_compose_is_reached_by_every_entry_point(tmp_path: Path) -> None:
    """Library `run` with a Playbook made by parse_playbook gets flat steps: nothing after compose sees a block."""
    pb: Playbook = parse_playbook(BLOCK, str(tmp_path / "pb.yml"))
    assert all(not s.structure() for s in pb.all_steps())
    with pytest.raises(PlaybookError):
        parse_playbook("runbook: t\nsteps:\n  - include: nowhere.yml\n", str(tmp_path / "pb.yml"))


@pytest.fixture
def go_local(tmp_path: Path, local_inventory: InventoryWriter) -> Callable[..., Any]:
    def go(pb: Path, **kw: Any) -> Any:
        return run(pb, str(local_inventory(["a"])), audit_log=str(tmp_path / "audit.jsonl"),
                   state_dir=str(tmp_path / "runs"), **kw)
    return go


def test_site_runs_locally_with_role_templates_files_and_defaults(tmp_path: Path, site: Path, go_local) -> None:
    result = go_local(site)
    assert result.exit_code() == 0, [(r.step_id, r.status, r.message) for r in result.results]
    www = tmp_path / "hosts" / "a" / "www"
    assert (www / "index.html").read_text() == "<h1>Default title</h1>\nport=8080 hello production\n"
    assert (www / "motd").read_text() == "welcome\n"
    assert (www / "log").read_text().splitlines() == ["web ok", "reloaded"]   # the role's handler runs at the end


def test_a_blocks_condition_is_checked_once_where_it_is_written(tmp_path: Path) -> None:
    pb = write(tmp_path, {"pb.yml": "runbook: t\nsteps:\n  - name: grp\n    when: redy\n    block:\n"
                                    "      - name: a\n        shell: 'true'\n      - name: b\n        when: x == 1\n"
                                    "        shell: 'true'\n"})
    warnings = [p for p in validate_playbook(pb).warnings if p.code == "undefined-variable"]
    assert [(p.message.split("`")[1], str(p.location)) for p in warnings] == [("redy", f"{pb}:4:11"), ("x", f"{pb}:9:15")]


@pytest.mark.parametrize("key, value", [("ignore_errors", True), ("register", "r"), ("retries", 2), ("loop", [1, 2]),
                                         ("notify", ["h"])])
def test_keys_a_group_would_ignore_are_errors(tmp_path: Path, key: str, value: Any) -> None:
    pb = write(tmp_path, {"pb.yml": {"runbook": "t", "steps": [
        {"name": "grp", key: value, "block": [{"name": "a", "shell": "true"}]}]}})
    err = one_error(pb, f"`{key}` does nothing on a `block:` step")
    assert err.startswith(f"{pb}:{line_of(pb, key + ':')}:") and "put it on the steps inside" in err


def test_a_plan_made_with_start_at_step_predicts_the_steps_before_it_skipped(
        tmp_path: Path, local_inventory: InventoryWriter) -> None:
    pb = write(tmp_path, {"pb.yml": {"runbook": "t", "steps": [
        {"name": "one", "shell": "echo one >> {{ dir }}/log"}, {"name": "two", "shell": "echo two >> {{ dir }}/log"}]}})
    result = run(pb, str(local_inventory(["a"])), audit=False, mode="plan", start_at_step="two")
    one, two = result.get("a", "one"), result.get("a", "two")
    assert one is not None and (one.prediction, one.message) == ("skip", "before --start-at-step two")
    assert two is not None and two.prediction == "unknown"


def test_start_at_a_rescue_step_is_refused(tmp_path: Path, local_inventory: InventoryWriter) -> None:
    pb = write(tmp_path, {"pb.yml": BLOCK})
    with pytest.raises(ValidationError) as exc:
        run(pb, str(local_inventory(["a"])), audit=False, start_at_step="fix")
    assert "start at the block `deploy` instead" in str(exc.value)


def test_show_prints_every_kept_file(tmp_path: Path, site: Path, local_inventory: InventoryWriter,
                                     capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from runbook.cli import main

    monkeypatch.chdir(tmp_path)
    inv = local_inventory(["a"])
    assert main(["plan", str(site), "-i", str(inv), "--audit-log", str(tmp_path / "audit.jsonl"),
                 "--out", "plan.json"]) == 0
    capsys.readouterr()
    assert main(["show", "plan.json", "--playbook"]) == 0
    out = capsys.readouterr().out
    steps_file = (site.parent / "roles/web/steps.yml").resolve()
    assert out.startswith(site.read_text())
    assert f"\n# --- {steps_file} ---\n{steps_file.read_text()}" in out


def test_a_composed_playbook_pickles_with_everything_compose_set() -> None:
    """The cluster ships the composed playbook to workers: origins, groups and role data must travel."""
    import pickle

    pb = pickle.loads(pickle.dumps(load_playbook(FIXTURES / "site" / "site.yml")))
    page = pb.steps[1]
    assert str(compose.locate(pb, page)).endswith("roles/web/steps.yml:1:3")
    assert compose.role_defaults(page)["port"] == 80 and compose.namespace(page) == "web/"
    assert list(compose.groups(pb)) == ["web", "check"] and compose.units(pb, "steps") == ["prepare", "web", "check"]
    assert set(StepGraph.build(pb).graph.predecessors("check/look")) == {"web/motd"}


def test_a_roles_copy_and_upload_sources_come_from_its_files_first(tmp_path: Path, go_local) -> None:
    """`copy: src:` in a role reads the role's files/ (as upload and template do), not a same-named file beside the playbook."""
    pb = write(tmp_path, {
        "pb.yml": {"runbook": "t", "steps": [{"role": "conf"}]},
        "roles/conf/steps.yml": [{"name": "copied", "copy": {"src": "app.conf", "dest": "{{ dir }}/app.conf"}},
                                 {"name": "uploaded", "upload": {"src": "app.conf", "dest": "{{ dir }}/app.up"}}],
        "roles/conf/files/app.conf": "from the role\n",
        "app.conf": "beside the playbook\n",
    })
    assert not [p for p in problems(pb)], problems(pb)
    result = go_local(pb)
    assert result.exit_code() == 0, [(r.step_id, r.status, r.message) for r in result.results]
    host = tmp_path / "hosts" / "a"
    assert (host / "app.conf").read_text() == (host / "app.up").read_text() == "from the role\n"
    # With the file gone from both places, validate names the missing source where the role writes it.
    (tmp_path / "roles/conf/files/app.conf").unlink()
    (tmp_path / "app.conf").unlink()
    err = one_error(pb, "copy source `app.conf` is not a file")
    assert err.startswith(str(tmp_path / "roles/conf/steps.yml") + ":")


def test_resume_refuses_a_role_file_changed_since_the_run(tmp_path: Path, local_inventory: InventoryWriter) -> None:
    """The run state records every included, role and vars file; resume runs the same steps or says which file moved."""
    from tests.helpers import cli, records

    pb = write(tmp_path, {
        "pb.yml": {"runbook": "t", "steps": [{"role": "r"}]},
        "roles/r/steps.yml": [{"name": "gate", "shell": "test -f {{ dir }}/go"},
                              {"name": "work", "shell": "echo worked >> {{ dir }}/log"}],
    })
    inv, trail = local_inventory(["a"]), tmp_path / "trail" / "audit.jsonl"
    first = cli("run", str(pb), "-i", str(inv), "--audit-log", str(trail))
    assert first.returncode == 2, first.stderr
    run_id = records(trail)[0]["run_id"]
    assert str((tmp_path / "roles/r/steps.yml").resolve()) in records(trail)[0]["playbook_files"]
    (tmp_path / "hosts" / "a" / "go").write_text("")
    steps = tmp_path / "roles/r/steps.yml"
    steps.write_text(steps.read_text().replace("worked", "something else"))
    refused = cli("resume", run_id, "--audit-log", str(trail))
    assert refused.returncode != 0 and "steps.yml changed since the run (included, role or vars file)" in refused.stderr
    assert not (tmp_path / "hosts" / "a" / "log").exists()
    steps.write_text(steps.read_text().replace("something else", "worked"))
    resumed = cli("resume", run_id, "--audit-log", str(trail))
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "hosts" / "a" / "log").read_text() == "worked\n"


# --- templated source paths ------------------------------------------------------------------------

@pytest.mark.parametrize(("template", "rendered", "allowed"), [
    ("files/{{ app }}.conf", "files/web.conf", True),
    ("files/{{ app }}.conf", "files/sub/web.conf", True),
    ("files/{{ app }}.conf", "files/../../../etc/shadow.conf", False),    # leaves files/
    ("files/{{ app }}", "files/../site.yml", False),                      # inside the playbook, but not below files/
    ("files/{{ app }}", "files//etc/shadow", True),                       # an absolute value joins: files/etc/shadow
    ("app-{{ n }}", "app-x/../../outside.conf", False),                   # below the playbook's directory
    ("app-{{ n }}.conf", "app-1.conf", True),
    ("/srv/shared/{{ app }}", "/srv/shared/a/b", True),
    ("/srv/shared/{{ app }}", "/srv/shared/../../etc/shadow", False),
    ("~/keys/{{ app }}", "~/keys/../.ssh/id_ed25519", False),
    ("{{ backup_dir }}/backup.tar.gz", "/var/backups/x/backup.tar.gz", True),   # the value is the whole location
    ("{{ playbook_dir }}/files/{{ n }}", f"{FIXTURES}/site/files/a", True),       # playbook_dir is the author's
    ("{{ playbook_dir }}/files/{{ n }}", f"{FIXTURES}/site/files/../site.yml", False),
    ("{{playbook_dir}}/{{ n }}", "/etc/shadow", False),
    ("motd{{ suffix }}", "motd", True),                                   # the role's files/ is searched first
])
def test_a_value_in_a_source_path_picks_a_file_below_what_is_written_before_it(
        template: str, rendered: str, allowed: bool) -> None:
    from runbook.errors import RunbookError

    pb = load_playbook(FIXTURES / "site" / "site.yml")
    step = next(s for s in pb.steps if s.step_id == "web/motd")
    if allowed:
        assert compose.confined_source(pb, step, template, rendered) == compose.resolve_source(pb, step, rendered)
    else:
        with pytest.raises(RunbookError, match="is outside") as err:
            compose.confined_source(pb, step, template, rendered)
        assert "written before it" in (err.value.hint or "")

