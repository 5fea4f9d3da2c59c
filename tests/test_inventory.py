"""Inventory: Ansible YAML/INI formats, group_vars/host_vars, variable precedence, patterns, renderings."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runbook.errors import EXIT_INVALID, InventoryError
from runbook.inventory import (Inventory, expand_hostname_range, inventory_report, parse_host_pattern,
                               split_pattern)

FIXTURES = Path(__file__).parent / "fixtures" / "inventory"
REPO = Path(__file__).resolve().parent.parent
YAML_SITE = FIXTURES / "yaml_site" / "hosts.yml"
INI_SITE = FIXTURES / "ini_site" / "hosts.ini"


def write(base: Path, rel: str, text: str) -> Path:
    """Write a dedented file under base and return its path."""
    path = base / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def names(inv: Inventory, pattern: str, limit: str | None = None) -> list[str]:
    return [h.name for h in inv.select(pattern, limit)]


def load_error(*args, **kwargs) -> InventoryError:
    with pytest.raises(InventoryError) as info:
        Inventory.load(*args, ssh_config=False, **kwargs)
    return info.value


@pytest.fixture(scope="module", params=["yaml", "ini"])
def site(request) -> Inventory:
    """The same inventory written in both formats, with group_vars/ and host_vars/ trees beside it."""
    return Inventory.load(YAML_SITE if request.param == "yaml" else INI_SITE, ssh_config=False)


# --- ansible-inventory --list -----------------------------------------------------------------

def expected_list(fmt: str) -> dict:
    data = json.loads((FIXTURES / "yaml_site" / "expected_list.json").read_text())
    if fmt == "ini":
        # In the YAML file east/west are also listed under `all: children:`; in INI they only sit
        # under [prod:children]/[test:children], so Ansible makes only parentless groups children of all.
        data["all"]["children"] = ["ungrouped", "webservers", "dbservers", "prod", "test"]
    return data


@pytest.mark.parametrize("fmt,path", [("yaml", YAML_SITE), ("ini", INI_SITE)])
def test_list_matches_ansible_inventory_json(fmt: str, path: Path) -> None:
    inv = Inventory.load(path, ssh_config=False)
    assert inv.to_ansible_json() == expected_list(fmt)
    assert json.loads(inventory_report(inv, mode="list")) == expected_list(fmt)
    assert inv.warnings == []


def test_list_with_limit_keeps_only_the_limited_hosts() -> None:
    inv = Inventory.load(YAML_SITE, ssh_config=False)
    out = inv.to_ansible_json(limit="east")
    assert set(out["_meta"]["hostvars"]) == {"web01.example.com", "web02.example.com", "db-a.example.com"}
    assert out["webservers"] == {"hosts": ["web01.example.com", "web02.example.com"]}
    assert "west" not in out and "ungrouped" not in out  # groups left empty disappear, as in Ansible
    assert out["test"] == {"children": ["west"]}


# --- patterns ----------------------------------------------------------------------------------

WEB = ["web01.example.com", "web02.example.com", "web03.example.com"]
DB = ["db-a.example.com", "db-b.example.com", "db-c.example.com", "db-legacy.example.com"]
ALL = ["mail.example.com"] + WEB + DB


@pytest.mark.parametrize("pattern,expected", [
    ("all", ALL),
    ("*", ALL),
    ("webservers", WEB),
    ("webservers:dbservers", WEB + DB),
    ("webservers,dbservers", WEB + DB),
    ("dbservers:webservers", DB + WEB),                  # union terms keep their order, as in Ansible
    ("webservers:&prod", ["web01.example.com", "web02.example.com"]),
    ("prod:&dbservers", ["db-a.example.com"]),
    ("webservers:!web03.example.com", ["web01.example.com", "web02.example.com"]),
    ("all:!prod", ["mail.example.com", "web03.example.com"] + DB[1:]),
    ("!east", ["mail.example.com", "web03.example.com"] + DB[1:]),   # only exclusions: from all
    ("webservers:dbservers:&test:!db-c.example.com", ["web03.example.com", "db-b.example.com", "db-legacy.example.com"]),
    ("web*", WEB),
    ("*.example.com", ALL),
    ("db-?.example.com", DB[:3]),
    (r"~web\d+", WEB),
    (r"~(web|db-)0?[1a]", ["web01.example.com", "db-a.example.com"]),
    ("mail.example.com", ["mail.example.com"]),
    ("prod", ["web01.example.com", "web02.example.com", "db-a.example.com"]),   # through child group east
    ("test:prod", ["web03.example.com"] + DB[1:] + ["web01.example.com", "web02.example.com", "db-a.example.com"]),
    ("dbservers[0]", ["db-a.example.com"]),
    ("dbservers[-1]", ["db-legacy.example.com"]),
    ("dbservers[1:2]", ["db-b.example.com", "db-c.example.com"]),
    ("dbservers[2:]", ["db-c.example.com", "db-legacy.example.com"]),
    (" webservers : &prod ", ["web01.example.com", "web02.example.com"]),
])
def test_patterns_select_like_ansible(site: Inventory, pattern: str, expected: list[str]) -> None:
    assert names(site, pattern) == expected


@pytest.mark.parametrize("pattern,limit,expected", [
    ("all", "webservers", WEB),
    ("webservers", "east", ["web01.example.com", "web02.example.com"]),
    ("dbservers", "!db-a.example.com", DB[1:]),
    ("all", "web0[12]*", ["web01.example.com", "web02.example.com"]),
    ("webservers:dbservers", "test", ["web03.example.com"] + DB[1:]),
])
def test_limit_applies_on_top_of_the_pattern(site: Inventory, pattern: str, limit: str, expected: list[str]) -> None:
    assert names(site, pattern, limit) == expected


def test_pattern_matching_nothing_names_the_pattern_and_the_groups(site: Inventory) -> None:
    with pytest.raises(InventoryError) as info:
        site.select("webservers:dbserver")
    err = info.value
    assert "dbserver" in err.message and "webservers:dbserver" in err.message
    assert "dbservers" in (err.hint or "")
    assert err.exit_code == EXIT_INVALID
    with pytest.raises(InventoryError) as info:
        site.select("nosuchthing")
    assert "known groups:" in (info.value.hint or "") and "webservers" in (info.value.hint or "")


def test_an_empty_result_is_an_error_even_when_every_term_exists(site: Inventory) -> None:
    with pytest.raises(InventoryError, match="selects no host"):
        site.select("webservers:&dbservers")
    with pytest.raises(InventoryError, match="--limit `dbservers` leaves no host"):
        site.select("webservers", limit="dbservers")


def test_a_typo_in_an_exclusion_is_an_error_not_a_silent_no_op(site: Inventory) -> None:
    with pytest.raises(InventoryError, match="web3"):
        site.select("webservers:!web3")


@pytest.mark.parametrize("pattern,message", [
    ("~web(", "invalid regular expression"),
    ("dbservers[9]", "out of range"),
    ("webservers::dbservers", None),   # an empty term between colons is dropped, like Ansible
])
def test_bad_patterns(site: Inventory, pattern: str, message: str | None) -> None:
    if message is None:
        assert names(site, pattern) == WEB + DB
        return
    with pytest.raises(InventoryError, match=message):
        site.select(pattern)


def test_implicit_localhost_is_selectable_but_not_in_all(site: Inventory) -> None:
    [local] = site.select("localhost")
    assert local.connection == "local" and local.implicit
    assert "localhost" not in names(site, "all")


def test_split_pattern_splits_as_ansible_does() -> None:
    assert split_pattern("web[1:3]:&prod") == ["web[1:3]", "&prod"]
    assert split_pattern("web[1:3]:&prod,db") == ["web[1:3]:&prod", "db"]   # with a comma, only commas separate
    assert split_pattern(" web , db ") == ["web", "db"]
    assert split_pattern("web db:!x") == ["web", "db", "!x"]               # whitespace separates too
    assert split_pattern(r"~web\d{1,2}:!web03") == [r"~web\d{1,2}", "!web03"]   # a regex repeat's comma is kept
    assert split_pattern("fe80::1") == ["fe80::1"]
    assert split_pattern("web01:2222") == ["web01:2222"]                  # one host and port stays whole
    assert split_pattern("web[1:3]") == ["web[1:3]"]


# --- variables and precedence --------------------------------------------------------------------

def test_merged_variables_follow_ansible_precedence(site: Inventory) -> None:
    web01 = site.get("web01.example.com").vars
    web02 = site.get("web02.example.com").vars
    assert web01["http_port"] == 8443          # host_vars file > group_vars file > inline group
    assert web02["http_port"] == 8080          # group_vars/webservers.yml > inline [webservers:vars]
    assert web02["ntp_server"] == "ntp.site.example.com"   # group_vars/all.yml > inline all vars
    assert web02["tier"] == "web"              # group vars > all vars; same depth: later name wins
    assert site.get("mail.example.com").vars["tier"] == "unset"
    # Ansible merges every inline group var before any group_vars file, so group_vars/all.yml
    # beats the inline dbservers value.
    assert site.get("db-b.example.com").vars["backup_window"] == "02:00"
    assert site.get("db-a.example.com").vars["role"] == "primary"   # host_vars/NAME/ directory
    assert site.get("db-c.example.com").vars["replicas"] == 2       # group_vars/NAME/ directory, .yaml file


def test_precedence_levels_one_by_one(tmp_path: Path) -> None:
    inv_file = write(tmp_path, "hosts.yml", """
        all:
          vars: {a: all, b: all, c: all, d: all, e: all}
          children:
            parent:
              vars: {b: parent, c: parent, d: parent, e: parent}
              children:
                child:
                  vars: {c: child, d: child, e: child}
                  hosts:
                    h1:
                      d: host
                      e: host
                    h2:
    """)
    write(tmp_path, "host_vars/h1.yml", "e: host_vars\n")
    inv = Inventory.load(inv_file, ssh_config=False)
    assert inv.get("h1").vars == {"a": "all", "b": "parent", "c": "child", "d": "host", "e": "host_vars"}
    assert inv.get("h2").vars == {"a": "all", "b": "parent", "c": "child", "d": "child", "e": "child"}
    assert inv.get("h1").groups == ("parent", "child")
    origin = inv.get("h1").origins["c"]
    assert origin.location is not None and origin.location.file == str(inv_file) and origin.location.line == 8
    assert "child" in origin.scope


def test_group_vars_files_override_inline_vars_of_their_level(tmp_path: Path) -> None:
    inv_file = write(tmp_path, "hosts.ini", """
        [web]
        w1 x=inline_host
        w2

        [web:vars]
        x=inline_group
        y=inline_group

        [all:vars]
        z=inline_all
    """)
    write(tmp_path, "group_vars/web.yml", "x: file_group\ny: file_group\n")
    write(tmp_path, "group_vars/all/main.yml", "z: file_all\n")
    write(tmp_path, "host_vars/w1", "x: file_host\n")  # a vars file without extension, as Ansible allows
    inv = Inventory.load(inv_file, ssh_config=False)
    assert inv.get("w1").vars == {"x": "file_host", "y": "file_group", "z": "file_all"}
    assert inv.get("w2").vars == {"x": "file_group", "y": "file_group", "z": "file_all"}


def test_sibling_groups_merge_by_name_unless_a_priority_says_otherwise() -> None:
    text = """
        all:
          children:
            alpha: {vars: {v: alpha}, hosts: {h: null}}
            beta: {vars: {v: beta}, hosts: {h: null}}
    """
    assert Inventory.from_text(textwrap.dedent(text)).get("h").vars["v"] == "beta"
    prioritised = text.replace("{v: alpha}", "{v: alpha, ansible_group_priority: 10}")
    assert Inventory.from_text(textwrap.dedent(prioritised)).get("h").vars["v"] == "alpha"


def test_a_host_in_several_groups_is_one_host_with_the_union_of_groups() -> None:
    inv = Inventory.from_text(textwrap.dedent("""
        all:
          children:
            a: {hosts: {h1: {x: 1}}}
            b: {hosts: {h1: {y: 2}, h2: null}}
    """))
    assert list(inv.hosts) == ["h1", "h2"]
    assert inv.get("h1").groups == ("a", "b")
    assert inv.get("h1").vars == {"x": 1, "y": 2}


# --- INI details ------------------------------------------------------------------------------

def test_ini_values_quotes_spaces_literals_and_comments() -> None:
    inv = Inventory.from_text(textwrap.dedent("""
        # a comment
        ; another comment
        solo.example.com
        [app]
        a1 motd="hello world" n=5 f=1.5 ok=True l='[1, 2]' s='"quoted"' path=/srv/app  # trailing comment
        a2:2200 ansible_user=deploy

        [app:vars]
        greeting = good morning, all
        count=3
        quoted="3"
        hash_in_value=a#b
    """), fmt="ini")
    a1 = inv.get("a1").vars
    assert a1["motd"] == "hello world" and a1["n"] == 5 and a1["f"] == 1.5 and a1["ok"] is True
    assert a1["l"] == [1, 2] and a1["s"] == "quoted" and a1["path"] == "/srv/app"
    assert a1["greeting"] == "good morning, all" and a1["count"] == 3 and a1["quoted"] == "3"
    assert a1["hash_in_value"] == "a#b"       # no comments inside [group:vars] values, as in Ansible
    assert inv.get("a2").port == 2200 and inv.get("a2").user == "deploy"
    assert names(inv, "ungrouped") == ["solo.example.com"]


def test_ini_children_may_be_declared_before_the_child() -> None:
    inv = Inventory.from_text(textwrap.dedent("""
        [dc:children]
        web
        [web]
        w1
    """), fmt="ini")
    assert names(inv, "dc") == ["w1"]


@pytest.mark.parametrize("text,line,message", [
    ("[web]\nw1\n[dc:children]\nweb\ndbx\n", 5, "never declared"),
    ("[web]\nw1\n[db:vars]\nx=1\n", 3, "never declared"),
    ("[web:hostz]\nw1\n", 1, "unknown type"),
    ("[web]\nw1 novalue\n", 2, "key=value"),
    ("[web]\nw1 x=\"unterminated\n", 2, "quote"),
    ("[web]\nweb[05:01]\n", 2, "start is after the end"),
    ("[web]\nweb[a:03]\n", 2, "invalid range"),
    ("[web]\nw1:99999\n", 2, "invalid port"),
    ("[web]\nw1:\n", 2, "reserved for a port"),
    ("[web:vars]\nnovalue\n[web]\n", 2, "key=value"),
    ("[a:children]\nb\n[b:children]\na\n", 4, "its own ancestor"),
    ("[web bad]\n", 1, "invalid section header"),
])
def test_bad_ini_is_reported_with_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = write(tmp_path, "hosts", text)
    err = load_error(path)
    first = err.problems[0]
    assert any(message in p.message or message in (p.hint or "") for p in err.problems), err
    assert first.location is not None and first.location.file == str(path) and first.location.line == line
    assert err.exit_code == EXIT_INVALID


# --- ranges ------------------------------------------------------------------------------------

def test_ranges() -> None:
    assert expand_hostname_range("web[01:03].example.com") == ["web01.example.com", "web02.example.com",
                                                                "web03.example.com"]
    assert expand_hostname_range("db-[a:c]") == ["db-a", "db-b", "db-c"]
    assert expand_hostname_range("n[0:10:5]") == ["n0", "n5", "n10"]
    assert expand_hostname_range("r[1:2]-[a:b]") == ["r1-a", "r1-b", "r2-a", "r2-b"]
    assert expand_hostname_range("plain") == ["plain"]
    assert parse_host_pattern("[2001:db8::1]:2222") == (["2001:db8::1"], 2222)
    assert parse_host_pattern("fe80::1") == (["fe80::1"], None)
    assert parse_host_pattern("web[1:2]:22") == (["web1", "web2"], 22)
    for bad in ("w[1:]", "w[1:2:0]", "w[1:2:3:4]", "w[01:100]", "w[aa:b]"):
        with pytest.raises(ValueError, match="range"):
            expand_hostname_range(bad)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 300), st.integers(0, 300), st.integers(1, 7), st.booleans())
def test_numeric_ranges_are_inclusive_stepped_and_padded(a: int, b: int, step: int, pad: bool) -> None:
    lo, hi = min(a, b), max(a, b)
    width = len(str(hi)) + 1 if pad else 0
    start = str(lo).zfill(width) if pad else str(lo)
    end = str(hi).zfill(width) if pad else str(hi)
    got = expand_hostname_range(f"h[{start}:{end}:{step}]")
    assert [int(x[1:]) for x in got] == list(range(lo, hi + 1, step))
    assert all(len(x) == width + 1 for x in got) if pad else True


def test_a_yaml_host_key_with_a_range_and_a_port() -> None:
    inv = Inventory.from_text("all:\n  hosts:\n    'app[1:3]:2200':\n      role: app\n")
    assert list(inv.hosts) == ["app1", "app2", "app3"]
    assert {h.port for h in inv.hosts.values()} == {2200}
    assert inv.get("app2").vars == {"ansible_port": 2200, "role": "app"}


# --- YAML errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,line,message", [
    ("all:\n  hosts:\n    w1: {ansible_port: 70000}\n", 3, "invalid port"),
    ("all:\n  hosts:\n    w1:\n      ansible_port: twenty\n", 4, "invalid port"),
    ("all:\n  hosts:\n    - w1\n    - w2\n", 3, "must be a mapping"),
    ("all:\n  children:\n    a:\n      children:\n        b:\n          children:\n            a:\n", 7, "its own ancestor"),
    ("all:\n  children:\n    a:\n      children:\n        a:\n", 5, "its own ancestor"),
    ("all:\n  hosts:\n    w1: a: b\n", 3, "malformed YAML"),
    ("all:\n  hosts:\n    web[3:1]:\n", 3, "start is after the end"),
    ("- just\n- a list\n", 1, "mapping of groups"),
    ("all:\n  vars: [1, 2]\n", 2, "must be a mapping"),
    ("all:\n  hosts:\n    w1:\n      ansible_connection: winrm\n", 4, "unsupported connection"),
    ("all:\n  hosts:\n    w1:\n      a: 1\n      a: 2\n", 5, "duplicate key"),
])
def test_bad_yaml_is_reported_with_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = write(tmp_path, "hosts.yml", text)
    err = load_error(path)
    assert any(message in p.message for p in err.problems), err
    located = [p for p in err.problems if message in p.message][0]
    assert located.location is not None and located.location.file == str(path) and located.location.line == line
    assert "Traceback" not in str(err)


def test_hosts_written_as_a_list_gets_a_hint(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, "hosts.yml", "all:\n  hosts:\n    - w1\n"))
    assert "key ending in `:`" in (err.problems[0].hint or "")


def test_a_port_error_points_at_the_group_vars_file_that_set_it(tmp_path: Path) -> None:
    inv_file = write(tmp_path, "hosts.ini", "[web]\nw1\n")
    vars_file = write(tmp_path, "group_vars/web.yml", "# ports\nansible_port: -1\n")
    err = load_error(inv_file)
    assert err.problems[0].location is not None
    assert (err.problems[0].location.file, err.problems[0].location.line) == (str(vars_file), 2)


@pytest.mark.parametrize("setup,message", [
    (lambda d: d / "missing.yml", "inventory not found"),
    (lambda d: write(d, "bin.yml", "").parent / "bin.yml", None),
])
def test_unreadable_inventories(tmp_path: Path, setup, message: str | None) -> None:
    path = setup(tmp_path)
    if message is None:
        path.write_bytes(b"all:\n  hosts:\n    caf\xe9:\n")
        message = "not valid UTF-8"
    err = load_error(path)
    assert message in err.message and err.location is not None and err.location.file == str(path)


def test_a_malformed_group_vars_file_is_located(tmp_path: Path) -> None:
    inv_file = write(tmp_path, "hosts.yml", "all:\n  hosts:\n    w1:\n")
    vars_file = write(tmp_path, "group_vars/all.yml", "x: [1, 2\n")
    err = load_error(inv_file)
    assert err.problems[0].location is not None and err.problems[0].location.file == str(vars_file)


# --- connection variables and ~/.ssh/config -----------------------------------------------------------

def test_connection_variables_ansible_and_native_spellings() -> None:
    inv = Inventory.from_text(textwrap.dedent("""
        all:
          hosts:
            a:
              ansible_host: 10.0.0.1
              ansible_port: "2201"
              ansible_user: deploy
              ansible_ssh_private_key_file: ~/.ssh/deploy
              ansible_become_user: postgres
            b:
              host: 10.0.0.2
              port: 2202
              user: ops
              ssh_private_key_file: /keys/ops
              connection: local
              become_user: root
            c:
              ansible_connection: smart
    """))
    a, b, c = inv.get("a"), inv.get("b"), inv.get("c")
    assert (a.address, a.port, a.user, a.become_user, a.connection) == ("10.0.0.1", 2201, "deploy", "postgres", "ssh")
    assert a.key_file is not None and a.key_file.endswith("/.ssh/deploy") and "~" not in a.key_file
    assert (b.address, b.port, b.user, b.key_file, b.connection, b.become_user) == \
        ("10.0.0.2", 2202, "ops", "/keys/ops", "local", "root")
    assert b.is_local and not a.is_local
    assert (c.address, c.port, c.user, c.connection) == ("c", 22, None, "ssh")


def test_the_more_specific_level_wins_between_spellings() -> None:
    inv = Inventory.from_text(textwrap.dedent("""
        all:
          vars: {ansible_port: 2000}
          children:
            g:
              vars: {port: 3000}
              hosts:
                h1:
                h2: {ansible_port: 4000, port: 5000}
    """))
    assert inv.get("h1").port == 3000          # native name in the group beats the Ansible name in `all`
    assert inv.get("h2").port == 4000          # same level: the Ansible name wins


def test_ssh_common_args_is_accepted_and_ignored_with_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, "hosts.ini", "[web]\nw1\nw2\n[web:vars]\nansible_ssh_common_args='-o ProxyCommand=x'\n")
    inv = Inventory.load(path, ssh_config=False)
    assert [h.name for h in inv.select("web")] == ["w1", "w2"]
    warned = [w for w in inv.warnings if "ansible_ssh_common_args" in w.message]
    assert len(warned) == 1 and warned[0].location is not None and warned[0].location.line == 5


def test_ssh_config_is_used_and_inventory_values_override_it(tmp_path: Path) -> None:
    cfg = write(tmp_path, "ssh_config", """
        Host bastion-*
            User jump
        Host web1 web2
            HostName %h.internal.example.com
            Port 2022
            User cfguser
            IdentityFile ~/.ssh/web_key
            ProxyJump bastion-1
        Host db1
            HostName 10.9.9.9
    """)
    inv_file = write(tmp_path, "hosts.yml", """
        all:
          hosts:
            web1:
            web2: {ansible_port: 22, ansible_user: me, ansible_ssh_private_key_file: /k}
            db1: {ansible_host: 10.1.1.1}
            local1: {ansible_connection: local}
    """)
    inv = Inventory.load(inv_file, ssh_config=cfg)
    w1, w2, db1, loc = (inv.get(n) for n in ("web1", "web2", "db1", "local1"))
    assert (w1.address, w1.port, w1.user, w1.proxy_jump) == ("web1.internal.example.com", 2022, "cfguser", "bastion-1")
    assert w1.key_file is not None and w1.key_file.endswith("/.ssh/web_key")
    assert (w2.address, w2.port, w2.user, w2.key_file) == ("web2.internal.example.com", 22, "me", "/k")
    assert db1.address == "10.1.1.1"           # ansible_host is not an alias in the ssh config: used as is
    assert loc.address == "local1" and loc.proxy_jump is None
    report = inv.describe_host("web1")
    assert report["connection"]["port"]["from"].startswith(str(cfg))


# --- directories, defaults and the shipped inventories ------------------------------------------------

def test_a_directory_inventory_merges_its_files(tmp_path: Path) -> None:
    inv_dir = tmp_path / "inv"
    write(inv_dir, "01-web.yml", "all:\n  children:\n    web:\n      hosts:\n        w1:\n        w2:\n")
    write(inv_dir, "02-db", "[db]\nd1\n[web]\nw3\n")
    write(inv_dir, "sub/03-extra.ini", "[db]\nd2 x=1\n")
    write(inv_dir, "group_vars/web.yml", "role: web\n")
    write(inv_dir, "README.md", "# notes, not an inventory\n")
    write(inv_dir, "example.yml", "all:\n  hosts:\n    not-a-target:\n")
    write(inv_dir, "old.yml~", "garbage: [\n")
    inv = Inventory.load(inv_dir, ssh_config=False)
    assert list(inv.hosts) == ["w1", "w2", "d1", "w3", "d2"]
    assert names(inv, "web") == ["w1", "w2", "w3"] and inv.get("w3").vars == {"role": "web"}
    assert names(inv, "db") == ["d1", "d2"]


def test_several_sources_and_a_host_list() -> None:
    inv = Inventory.load([YAML_SITE, "extra1.example.com,extra2.example.com:2200,"], ssh_config=False)
    # As in Ansible: the host list's hosts join ungrouped while loading, mail.example.com (under `all: hosts:`) after.
    assert names(inv, "ungrouped") == ["extra1.example.com", "extra2.example.com", "mail.example.com"]
    assert inv.get("extra2.example.com").port == 2200


def test_default_inventory_is_the_local_machine_without_an_inventory_dir(tmp_path: Path) -> None:
    inv = Inventory.default(tmp_path)
    [host] = inv.select()
    assert (host.name, host.connection, host.is_local) == ("localhost", "local", True)


def test_default_inventory_reads_the_inventory_dir(tmp_path: Path) -> None:
    write(tmp_path, "inventory/hosts.ini", "[web]\nw1\n")
    assert names(Inventory.default(tmp_path, ssh_config=False), "all") == ["w1"]


def test_the_shipped_default_inventory_is_only_the_local_machine() -> None:
    inv = Inventory.default(REPO)
    assert [(h.name, h.connection) for h in inv.select("all")] == [("localhost", "local")]


def test_the_shipped_examples_agree_in_both_formats() -> None:
    yml = Inventory.load(REPO / "inventory" / "example.yml", ssh_config=False)
    ini = Inventory.load(REPO / "inventory" / "example.ini", ssh_config=False)
    assert yml.to_ansible_json() == ini.to_ansible_json()
    assert yml.graph() == ini.graph()
    assert names(yml, "web:&prod") == ["web01.example.com", "web02.example.com", "web03.example.com"]
    reports = yml.get("db-reports.example.com")
    assert (reports.address, reports.port, reports.user) == ("10.0.3.17", 2222, "ops")
    assert reports.vars["env"] == "staging" and yml.warnings == [] and ini.warnings == []


# --- renderings ---------------------------------------------------------------------------------

def test_graph_is_shaped_like_ansible_inventory_graph() -> None:
    inv = Inventory.from_text(textwrap.dedent("""
        [web]
        w2
        w1
        [db]
        d1
        [prod:children]
        web
        [prod]
        p1
    """), fmt="ini")
    assert inv.graph() == textwrap.dedent("""\
        @all:
          |--@db:
          |  |--d1
          |--@prod:
          |  |--@web:
          |  |  |--w1
          |  |  |--w2
          |  |--p1
          |--@ungrouped:""")
    assert inv.graph("prod", limit="w1:p1") == "@prod:\n  |--@web:\n  |  |--w1\n  |--p1"
    with pytest.raises(InventoryError, match="unknown group"):
        inv.graph("prd")


def test_host_report_says_where_each_value_came_from(site: Inventory) -> None:
    report = json.loads(inventory_report(site, mode="host", host="web01.example.com"))
    assert report["vars"]["http_port"]["value"] == 8443
    assert "host_vars/web01.example.com.yml:1" in report["vars"]["http_port"]["from"]
    assert "group_vars/all.yml:2" in report["vars"]["ntp_server"]["from"]
    assert report["connection"]["port"] == report["connection"]["port"] | {"value": 2201}
    assert report["groups"] == ["prod", "webservers", "east"]
    with pytest.raises(InventoryError, match="unknown host"):
        site.describe_host("web1.example.com")
    with pytest.raises(InventoryError, match="outside --limit"):
        inventory_report(site, mode="host", host="web01.example.com", limit="dbservers")


def test_content_hash_changes_with_any_file_read(tmp_path: Path) -> None:
    inv_file = write(tmp_path, "hosts.ini", "[web]\nw1\n")
    write(tmp_path, "group_vars/web.yml", "x: 1\n")
    before = Inventory.load(inv_file, ssh_config=False).content_hash()
    assert before == Inventory.load(inv_file, ssh_config=False).content_hash()
    write(tmp_path, "group_vars/web.yml", "x: 2\n")
    assert Inventory.load(inv_file, ssh_config=False).content_hash() != before


def test_cli_inventory_list_matches_the_expected_json(capsys: pytest.CaptureFixture[str]) -> None:
    cli_mod = pytest.importorskip("runbook.cli")
    if "inventory" not in getattr(cli_mod.cli, "commands", {}):
        pytest.skip("`runbook inventory` is not wired into the CLI yet")
    assert cli_mod.main(["inventory", "-i", str(YAML_SITE), "--list"]) == 0
    assert json.loads(capsys.readouterr().out) == expected_list("yaml")
    assert cli_mod.main(["inventory", "-i", str(INI_SITE), "--limit", "east", "--graph"]) == 0
    assert capsys.readouterr().out.strip() == Inventory.load(INI_SITE, ssh_config=False).graph(limit="east")
    assert cli_mod.main(["inventory", "-i", str(YAML_SITE), "--limit", "nope", "--list"]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "`nope`" in err and "known groups:" in err and "Traceback" not in err
    bad = FIXTURES / "yaml_site" / "missing.yml"
    assert cli_mod.main(["inventory", "-i", str(bad), "--list"]) == EXIT_INVALID
    assert "inventory not found" in capsys.readouterr().err


def test_warnings_for_clashes_and_unused_vars_files(tmp_path: Path) -> None:
    inv_file = write(tmp_path, "hosts.ini", "[all]\nweb\nsolo\n[web]\nw1\n")
    write(tmp_path, "group_vars/webs.yml", "x: 1\n")
    write(tmp_path, "host_vars/w2.yml", "x: 1\n")
    inv = Inventory.load(inv_file, ssh_config=False)
    # As in Ansible: the exact name selects the host, `web[0]` the group; and Ansible puts "the child
    # named web" under ungrouped, which is the group, so ungrouped reaches w1 rather than the host.
    assert names(inv, "web") == ["web"] and names(inv, "web[0]") == ["w1"]
    assert names(inv, "ungrouped") == ["solo", "w1"]
    codes = sorted(w.code for w in inv.warnings)
    assert codes == ["host-group-clash", "unused-vars-file", "unused-vars-file"]
    assert any("did you mean `web`" in (w.hint or "") for w in inv.warnings)


@pytest.mark.parametrize("name,text", [("hosts", "# nothing yet\n"), ("hosts.yml", "---\n# nothing yet\n")])
def test_an_empty_inventory_file_warns_and_selects_nothing(tmp_path: Path, name: str, text: str) -> None:
    inv = Inventory.load(write(tmp_path, name, text), ssh_config=False)
    assert [w.code for w in inv.warnings] == ["empty-inventory"]
    with pytest.raises(InventoryError, match="selects no host"):
        inv.select("all")
