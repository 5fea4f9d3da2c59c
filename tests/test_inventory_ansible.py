"""runbook against the real Ansible: inventories written for the purpose, outputs recorded from ansible-core.

tests/fixtures/inventory/ansible/expected/*.json were written by make_expected.py beside them, which runs
`ansible-inventory --list`, `ansible PATTERN --list-hosts` and `ansible-inventory --host` from a throwaway
ansible-core virtualenv. These tests only read the recorded outputs: Ansible is not needed to run them.
"""

from __future__ import annotations

import json
import re
import textwrap
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from runbook.errors import EXIT_INVALID, InventoryError
from runbook.inventory import (MAX_INVENTORY_HOSTS, MAX_RANGE_HOSTS, Inventory, RangeTooLarge, count_hostname_range,
                               expand_hostname_range, inventory_report)

from .helpers import cli

ANSIBLE = Path(__file__).parent / "fixtures" / "inventory" / "ansible"
CASES = {p.name.removesuffix(".json"): json.loads(p.read_text()) for p in sorted((ANSIBLE / "expected").glob("*.json"))}
# Warnings runbook gives where Ansible is silent: a host name with a space, a listing that leaves out the implicit localhost.
RUNBOOK_ONLY_WARNINGS = {"bare-host-name", "implicit-localhost"}


def inventory(case: str) -> Inventory:
    return Inventory.load(ANSIBLE / CASES[case]["inventory"], ssh_config=False)


def run_cli(args: list[str], cwd: Path) -> tuple[int, str, str]:
    proc = cli(*args, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


def names(inv: Inventory, pattern: str, limit: str | None = None) -> list[str]:
    return [h.name for h in inv.select(pattern, limit)]


def ansible_list(data: dict[str, Any]) -> dict[str, Any]:
    """ansible-inventory's JSON without `_meta.profile`, the name of its serialisation (2.19+), which runbook does not emit."""
    data = json.loads(json.dumps(data))
    data["_meta"].pop("profile", None)
    return data


def cases_with(key: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for case, data in CASES.items():
        items = data[key].items() if isinstance(data[key], dict) else enumerate(data[key])
        out.extend((case, item) for item in items)
    return out


def test_the_recorded_outputs_are_there_and_come_from_ansible() -> None:
    assert len(CASES) >= 8
    for data in CASES.values():
        assert data["made_by"].startswith("ansible [core 2.19"), data["made_by"]
    assert {Path(d["inventory"]).suffix for d in CASES.values()} == {".yml", ".ini"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_list_is_what_ansible_inventory_prints(case: str) -> None:
    inv = inventory(case)
    assert inv.to_ansible_json() == ansible_list(CASES[case]["list"])
    assert json.loads(inventory_report(inv, mode="list")) == ansible_list(CASES[case]["list"])


@pytest.mark.parametrize("case,item", cases_with("list_limited"), ids=lambda v: str(v))
def test_list_under_a_limit_is_what_ansible_inventory_prints(case: str, item: tuple[str, dict]) -> None:
    limit, expected = item
    assert inventory(case).to_ansible_json(limit) == ansible_list(expected)


@pytest.mark.parametrize("case,item", cases_with("hosts"), ids=lambda v: str(v))
def test_patterns_select_the_hosts_ansible_lists_in_its_order(case: str, item: tuple[str, list[str]]) -> None:
    pattern, expected = item
    inv = inventory(case)
    if not expected:
        # Ansible lists no host and stops; runbook says so as an error (exit 4).
        with pytest.raises(InventoryError, match="selects no host"):
            inv.select(pattern)
        return
    assert names(inv, pattern) == expected


@pytest.mark.parametrize("case,item", cases_with("limited"), ids=lambda v: str(v))
def test_limit_keeps_the_pattern_order_as_ansible_does(case: str, item: tuple[int, dict]) -> None:
    _, entry = item
    assert names(inventory(case), entry["pattern"], entry["limit"]) == entry["hosts"]


@pytest.mark.parametrize("case,item", cases_with("host"), ids=lambda v: str(v))
def test_host_vars_are_what_ansible_inventory_host_prints(case: str, item: tuple[str, dict]) -> None:
    name, expected = item
    expected = dict(expected)
    expected.pop("ansible_python_interpreter")   # the Python running Ansible; runbook runs no Python modules
    report = inventory(case).describe_host(name)
    assert {k: v["value"] for k, v in report["vars"].items()} == expected


def normalised(warning: str) -> tuple[str, ...]:
    """The facts of one warning, from Ansible's wording or runbook's."""
    patterns = [
        (r"Skipping (?:unexpected )?key \((.+?)\) in group \((.+?)\)", "key"),
        (r"skipping (?:unknown )?key `(.+?)` in group `(.+?)`", "key"),
        (r"Skipping '(.+?)' as this is not a valid group definition", "group"),
        (r"skipping group `(.+?)`", "group"),
        (r"Found both group and host with same name: (\S+)", "clash"),
        (r"`(.+?)` is both a host and a group", "clash"),
    ]
    for rx, kind in patterns:
        m = re.match(rx, warning)
        if m:
            return (kind, *m.groups())
    return ("other", warning)


@pytest.mark.parametrize("case", sorted(CASES))
def test_warnings_are_the_ones_ansible_gives(case: str) -> None:
    inv = inventory(case)
    ours = [w for w in inv.warnings if w.code not in RUNBOOK_ONLY_WARNINGS]
    assert sorted(normalised(w.message) for w in ours) == sorted(normalised(w) for w in CASES[case]["warnings"])
    for w in inv.warnings:
        assert w.location is not None and w.location.line and w.location.column, w


# --- the points of the comparison, one by one ----------------------------------------------------------

def test_bare_host_names_under_hosts_are_one_host_each() -> None:
    inv = inventory("bare_hosts.yml")
    assert names(inv, "workers") == ["worker1"] and names(inv, "frontends") == ["app1"]
    assert inv.groups["edge"].children == ["workers"]
    assert inv.get("edge1").vars["maintenance"] is None
    [spaced] = [w for w in inv.warnings if w.code == "bare-host-name"]
    assert "batch1 batch2" in spaced.message and spaced.location is not None and spaced.location.line == 16


def test_a_bare_host_name_is_one_name_whatever_it_holds(tmp_path: Path) -> None:
    # A bare value is never split, parsed or expanded beyond Ansible's ranges: shell text stays a (warned) name.
    path = tmp_path / "hosts.yml"
    path.write_text("all:\n  children:\n    web:\n      hosts: 'w1; touch /tmp/pwned $(id)'\n")
    inv = Inventory.load(path, ssh_config=False)
    assert list(inv.hosts) == ["w1; touch /tmp/pwned $(id)"]
    assert [w.code for w in inv.warnings] == ["bare-host-name"]
    # A name that climbs out of host_vars/ reads no file there (Ansible would read host_vars/../secret.yml).
    (tmp_path / "host_vars").mkdir()
    (tmp_path / "secret.yml").write_text("token: hunter2\n")
    path.write_text("all:\n  children:\n    web:\n      hosts: '../secret'\n")
    inv = Inventory.load(path, ssh_config=False)
    assert list(inv.hosts) == ["../secret"] and inv.get("../secret").vars == {}


def test_a_vars_section_indented_under_children_warns_and_points_at_the_indentation() -> None:
    inv = inventory("misindented.yml")
    assert "vars" in inv.groups and inv.groups["vars"].parents == ["all"]
    assert "http_port" not in inv.get("web1").vars            # skipped, as Ansible skips it
    [port] = [w for w in inv.warnings if "`http_port`" in w.message]
    assert port.severity == "warning" and port.location is not None and (port.location.line, port.location.column) == (15, 7)
    assert "indented under `children:`" in (port.hint or "")
    [typo] = [w for w in inv.warnings if "`host`" in w.message]
    assert "did you mean `hosts`" in (typo.hint or "")


def test_ini_host_lines_may_start_with_a_range() -> None:
    inv = inventory("leading_range.ini")
    assert names(inv, "ungrouped") == ["1.node.example.com", "2.node.example.com", "3.node.example.com"]
    assert inv.get("a-web.example.com").port == 2222 and inv.get("a-web.example.com").vars["role"] == "frontend"
    assert inv.get("02.db.example.com").user == "postgres"


@pytest.mark.parametrize("text,line,message", [
    ("[web]\n[web bad]\n", 2, "invalid section header"),
    ("[web]\n[web]x\n", 2, "invalid range"),
    ("[web]\n[1:2\n", 2, "invalid section header"),
    ("[web]\n[1:2]\n", 2, "unknown type"),
])
def test_a_line_starting_with_a_bracket_is_still_checked(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = tmp_path / "hosts"
    path.write_text(text)
    with pytest.raises(InventoryError) as info:
        Inventory.load(path, ssh_config=False)
    [problem] = info.value.problems
    assert message in problem.message and problem.location is not None and problem.location.line == line


def test_nested_children_come_after_the_groups_own_hosts_level_by_level() -> None:
    for case in ("nested_children.yml", "nested_children.ini"):
        inv = inventory(case)
        assert inv.group_hosts("site") == ["gateway", "web2", "web1", "db1", "cache1", "web9", "web3", "web7"]
        assert names(inv, "site[0]") == ["gateway"] and names(inv, "site[1:]")[:2] == ["web2", "web1"]
        # Not the file order, which would put web9 right after web1.
        assert list(inv.hosts).index("web9") < list(inv.hosts).index("db1")


def test_union_terms_keep_their_order_and_filters_keep_it() -> None:
    inv = inventory("union_order.ini")
    assert names(inv, "g2:g1") == ["d", "c", "b", "a"] and names(inv, "g1:g2") == ["a", "b", "c", "d"]
    assert names(inv, "g2:&g1") == ["c", "b"] and names(inv, "g1:&g2") == ["b", "c"]
    assert names(inv, "g2:g1:!c") == ["d", "b", "a"]
    # Several groups matched by one glob: a subscript counts a host once per group, as Ansible does.
    assert names(inv, "g*[2:4]") == ["c", "d"]


def test_the_order_decides_rolling_batches(tmp_path: Path) -> None:
    from runbook import run

    text = (ANSIBLE / "union_order.ini").read_text() + "\n[all:vars]\nansible_connection=local\n"
    (tmp_path / "hosts.ini").write_text(text)
    log = tmp_path / "order.log"
    (tmp_path / "pb.yml").write_text(textwrap.dedent(f"""\
        runbook: order
        hosts: "g2:g1"
        batch: 1
        concurrency: 1
        steps:
          - name: note
            shell: echo {{{{ inventory_hostname }}}} >> {log}
    """))
    result = run(str(tmp_path / "pb.yml"), str(tmp_path / "hosts.ini"), audit_log=str(tmp_path / "audit.jsonl"),
                 state_dir=str(tmp_path / "runs"))
    assert result.exit_code() == 0
    assert log.read_text().split() == CASES["union_order.ini"]["hosts"]["g2:g1"]


def test_a_host_named_like_a_group_is_the_host_for_the_exact_name_only() -> None:
    inv = inventory("clash.ini")
    assert names(inv, "web") == ["web"] and names(inv, "web[0]") == ["w1"] and names(inv, "we*") == ["w1", "web"]
    [clash] = [w for w in inv.warnings if w.code == "host-group-clash"]
    assert "selects the host" in clash.message


# --- implicit localhost -----------------------------------------------------------------------------------

def test_the_implicit_localhost_has_the_vars_ansible_gives_it() -> None:
    inv = inventory("implicit_localhost__hosts.ini")
    [local] = inv.select("localhost")
    assert local.implicit and local.is_local and local.groups == ()
    assert local.vars == {"ntp": "ntp.example.com", "timezone": "UTC", "ansible_connection": "local",
                          "backup_dir": "/srv/backup"}
    assert names(inv, "all") == ["web1", "web2"]                 # never part of `all`
    assert names(inv, "localhost:127.0.0.1") == ["localhost"]   # one implicit localhost, named as first asked
    assert not [w for w in inv.warnings if w.code == "unused-vars-file"]   # host_vars/localhost.yml is used


def test_an_inventory_localhost_stands_for_every_localhost_name() -> None:
    inv = inventory("defined_localhost.ini")
    assert names(inv, "localhost") == ["127.0.0.1"] and not inv.get("localhost").implicit


def test_inventory_cli_and_library_agree_on_the_implicit_localhost(tmp_path: Path) -> None:
    path = ANSIBLE / "implicit_localhost" / "hosts.ini"
    inv = Inventory.load(path, ssh_config=False)
    assert names(inv, "localhost") == ["localhost"]
    code, out, err = run_cli(["inventory", "-i", str(path), "--limit", "localhost", "--list"], cwd=tmp_path)
    assert code == 0
    assert json.loads(out) == ansible_list(CASES["implicit_localhost__hosts.ini"]["list_limited"]["localhost"])
    assert "implicit localhost" in err and "--host localhost" in err      # says why the listing leaves it out
    code, out, err = run_cli(["inventory", "-i", str(path), "--limit", "localhost", "--host", "localhost"], cwd=tmp_path)
    assert code == 0, err
    assert json.loads(out)["vars"]["backup_dir"]["value"] == "/srv/backup"
    code, _, err = run_cli(["inventory", "-i", str(path), "--limit", "web1", "--host", "localhost"], cwd=tmp_path)
    assert code == EXIT_INVALID and "outside --limit" in err


# --- unmatched terms ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern,limit,term", [
    ("g1:nosuch", None, "`nosuch`"),
    ("g1:!g9", None, "`!g9`"),
    ("g1:&gg2", None, "`&gg2`"),
    ("g1", "g1:nope", "`nope` of --limit `g1:nope`"),
])
def test_a_term_that_matches_nothing_is_an_error_naming_that_term(pattern: str, limit: str | None, term: str) -> None:
    # Ansible warns and ignores such a term; runbook refuses, so that a typo in `!` never runs on the spared host.
    with pytest.raises(InventoryError) as info:
        inventory("union_order.ini").select(pattern, limit)
    assert term in info.value.message and "matches no group and no host" in info.value.message
    assert info.value.exit_code == EXIT_INVALID


# --- the range limit --------------------------------------------------------------------------------

def peak_allocation(fn: Any) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        try:
            value = fn()
        except Exception as exc:   # returned, so that the caller checks it after measuring
            value = exc
        return value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name,text,column", [
    ("hosts", "[web]\nweb01\n  h[1:99999999]\n", 3),
    ("hosts", "[web]\nweb01\n[1:99999999].example.com\n", 1),
    ("hosts.yml", "all:\n  hosts:\n    web01:\n    h[1:99999999]:\n", 5),
    ("hosts.yml", "all:\n  children:\n    web:\n      hosts: h[1:99999999]\n", 14),
    ("hosts", "[web]\nweb01\nr[1:1000]-[1:1000]\n", 1),   # ranges multiply: a million names
])
def test_an_oversized_range_is_refused_before_anything_is_expanded(tmp_path: Path, name: str, text: str, column: int) -> None:
    path = tmp_path / name
    path.write_text(text)
    err, peak = peak_allocation(lambda: Inventory.load(path, ssh_config=False))
    assert isinstance(err, InventoryError), err
    assert peak < 5_000_000                                    # the range alone would take gigabytes
    [problem] = err.problems
    assert problem.location is not None and problem.location.file == str(path)
    assert (problem.location.line, problem.location.column) == (len(text.splitlines()), column)
    assert f"expected at most {MAX_RANGE_HOSTS:,} hosts per range" in problem.message
    assert "typo" in (problem.hint or "")


def test_the_range_functions_count_without_expanding() -> None:
    assert count_hostname_range("h[1:99999999]") == 99_999_999
    assert count_hostname_range("h[0:100:10]-[a:c]") == 33
    assert count_hostname_range("plain") == 1
    assert count_hostname_range(f"h[1:{MAX_RANGE_HOSTS}]") == MAX_RANGE_HOSTS
    err, peak = peak_allocation(lambda: expand_hostname_range(f"h[1:{MAX_RANGE_HOSTS + 1}]"))
    assert isinstance(err, RangeTooLarge) and isinstance(err, ValueError) and peak < 1_000_000


def test_a_host_list_with_an_oversized_range_is_refused(tmp_path: Path) -> None:
    err, peak = peak_allocation(lambda: Inventory.load("h[1:99999999],", ssh_config=False))
    assert isinstance(err, InventoryError) and peak < 5_000_000
    assert "expands to 99,999,999 hosts" in err.message


def test_the_inventory_total_is_limited_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Smaller limits, so that the test does not build 100,000 hosts; the code paths are the same.
    monkeypatch.setattr("runbook.inventory.MAX_INVENTORY_HOSTS", 50)
    path = tmp_path / "hosts"
    path.write_text("[a]\nh[1:30]\n[b]\nh[21:40]\nx[1:30]\ny[1:30]\n")
    with pytest.raises(InventoryError) as info:
        Inventory.load(path, ssh_config=False)
    [problem] = info.value.problems            # reported once, at the entry that crossed the limit
    assert problem.code == "too-many-hosts" and problem.location is not None and problem.location.line == 5
    assert "brings the inventory to 70 hosts: expected at most 50 hosts per inventory" in problem.message
    path.write_text("[a]\nh[1:30]\n[b]\nh[1:30]\nh[1:30]\n")   # repeats are the same hosts: accepted
    assert len(Inventory.load(path, ssh_config=False).hosts) == 30


def test_host_entries_are_limited_so_repeating_a_range_cannot_burn_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("runbook.inventory.MAX_HOST_ENTRIES", 100)
    path = tmp_path / "hosts"
    path.write_text("[a]\nh[1:40]\n[b]\nh[1:40]\n[c]\nh[1:40]\n")
    with pytest.raises(InventoryError) as info:
        Inventory.load(path, ssh_config=False)
    [problem] = info.value.problems
    assert problem.code == "too-many-hosts" and problem.location is not None and problem.location.line == 6


def test_the_documented_limits() -> None:
    assert MAX_RANGE_HOSTS == MAX_INVENTORY_HOSTS == 100_000
    doc = (Path(__file__).resolve().parent.parent / "docs" / "inventory.md").read_text()
    assert "100,000 hosts" in doc


def test_the_cli_reports_an_oversized_range_located_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("[web]\nh[1:99999999]\n")
    code, out, err = run_cli(["inventory", "-i", str(path), "--list"], cwd=tmp_path)
    assert code == EXIT_INVALID and out == ""
    assert f"{path}:2:1: error: range `h[1:99999999]` expands to 99,999,999 hosts" in err
    assert "hint:" in err and "Traceback" not in err
