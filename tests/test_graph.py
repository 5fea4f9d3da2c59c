"""The step graph: default needs, roots, parallel branches, cycles, renderings, and expansion over hosts."""

from __future__ import annotations

import textwrap

import pytest

from runbook.errors import PlaybookError, Problem
from runbook.graph import StepGraph, expand
from runbook.loader import parse_playbook
from runbook.model import Playbook

DIAMOND = """\
runbook: disk-pressure
steps:
  - name: measure usage
    shell: df
  - name: compress old logs
    shell: gzip
  - name: clean tmp
    needs: [measure-usage]
    command: [systemd-tmpfiles, --clean]
  - name: verify
    needs: [compress-old-logs, clean-tmp]
    shell: test
on_failure:
  - name: page on-call
    shell: echo page
  - name: open ticket
    shell: echo ticket
"""


def pb(text: str) -> Playbook:
    """Parse dedented playbook text."""
    return parse_playbook(textwrap.dedent(text), "g.yml")


def graph_problems(text: str) -> list[Problem]:
    """The problems StepGraph.build reports (asserting it refuses the playbook)."""
    with pytest.raises(PlaybookError) as info:
        StepGraph.build(pb(text))
    return info.value.problems


def at(p: Problem) -> tuple[int | None, int | None]:
    assert p.location is not None and p.location.file == "g.yml"
    return p.location.line, p.location.column


def test_needs_defaults_to_the_previous_step() -> None:
    g = StepGraph.build(pb("runbook: x\nsteps:\n  - {name: a, shell: x}\n  - {name: b, shell: x}\n  - {name: c, shell: x}\n"))
    assert sorted(g.graph.edges) == [("a", "b"), ("b", "c")]
    assert g.layers() == [["a"], ["b"], ["c"]]


def test_empty_needs_makes_a_root() -> None:
    g = StepGraph.build(pb("runbook: x\nsteps:\n  - {name: a, shell: x}\n  - {name: b, shell: x, needs: []}\n"))
    assert list(g.graph.edges) == []
    assert g.layers() == [["a", "b"]]


def test_parallel_branches_share_a_layer() -> None:
    g = StepGraph.build(pb(DIAMOND))
    assert g.layers() == [["measure-usage"], ["compress-old-logs", "clean-tmp"], ["verify"]]
    assert g.order() == ["measure-usage", "compress-old-logs", "clean-tmp", "verify"]
    assert g.upstream("verify") == {"measure-usage", "compress-old-logs", "clean-tmp"}
    assert g.rescue_order() == ["page-on-call", "open-ticket"]
    assert list(g.rescue.edges) == [("page-on-call", "open-ticket")]
    assert g.step("open-ticket").name == "open ticket"


def test_critical_path_takes_the_longest_branch() -> None:
    g = StepGraph.build(pb(DIAMOND))
    weights = {"measure-usage": 1, "compress-old-logs": 10, "clean-tmp": 3, "verify": 2}
    assert g.critical_path_length(weights) == 13
    assert g.critical_path_length({}) == 0


def test_order_is_topological_even_against_file_order() -> None:
    g = StepGraph.build(pb("runbook: x\nsteps:\n  - {name: late, shell: x, needs: [early]}\n  - {name: early, shell: x, needs: []}\n"))
    assert g.order() == ["early", "late"]


def test_text_rendering_shows_layers_and_parallel_branches() -> None:
    text = StepGraph.build(pb(DIAMOND)).to_text()
    assert text.splitlines() == [
        "runbook: disk-pressure",
        "layer 1",
        "  measure-usage [shell]",
        "layer 2  (parallel)",
        "  compress-old-logs [shell]  <- measure-usage",
        "  clean-tmp [command]  <- measure-usage",
        "layer 3",
        "  verify [shell]  <- compress-old-logs, clean-tmp",
        "on_failure",
        "  page-on-call [shell]",
        "  open-ticket [shell]",
    ]


def test_dot_rendering_has_nodes_and_edges() -> None:
    dot = StepGraph.build(pb(DIAMOND)).to_dot()
    assert dot.startswith('digraph "disk-pressure" {') and dot.rstrip().endswith("}")
    for edge in ['"measure-usage" -> "compress-old-logs";', '"measure-usage" -> "clean-tmp";',
                 '"compress-old-logs" -> "verify";', '"clean-tmp" -> "verify";', '"page-on-call" -> "open-ticket";']:
        assert edge in dot
    assert '{ rank=same; "compress-old-logs" "clean-tmp" }' in dot
    assert '"verify" [label="verify\\n[shell]"];' in dot
    assert dot.count("{") == dot.count("}")


def test_dot_quotes_awkward_names() -> None:
    dot = StepGraph.build(pb('runbook: \'say "hi"\'\nsteps:\n  - {name: \'a "b" \\ c\', id: q, shell: x}\n')).to_dot()
    assert 'digraph "say \\"hi\\"" {' in dot and '"q" [label="a \\"b\\" \\\\ c\\n[shell]"];' in dot


def test_mermaid_rendering_has_nodes_and_edges() -> None:
    mermaid = StepGraph.build(pb(DIAMOND)).to_mermaid()
    lines = mermaid.splitlines()
    assert lines[0] == "flowchart TD"
    assert 's0["measure usage<br/><small>measure-usage · shell</small>"]' in mermaid
    assert 's2["clean tmp<br/><small>clean-tmp · command</small>"]' in mermaid
    for edge in ["s0 --> s1", "s0 --> s2", "s1 --> s3", "s2 --> s3", "s4 --> s5"]:
        assert f"  {edge}" in lines or f"    {edge}" in lines
    assert "  subgraph on_failure" in lines and "  end" in lines


def test_mermaid_escapes_quotes() -> None:
    mermaid = StepGraph.build(pb("runbook: x\nsteps:\n  - {name: 'say \"hi\"', id: s, shell: x}\n")).to_mermaid()
    assert 'say #quot;hi#quot;' in mermaid and 'say "hi"' not in mermaid


def test_renderings_survive_newlines_and_markup_in_names() -> None:
    g = StepGraph.build(pb('runbook: x\nsteps:\n  - {name: "two\\nlines <b> #1", id: s, shell: x}\n'))
    dot = g.to_dot()
    assert '"s" [label="two\\nlines <b> #1\\n[shell]"];' in dot
    mermaid = g.to_mermaid()
    assert "two<br/>lines #60;b#62; #35;1" in mermaid and len(mermaid.splitlines()) == 2


def test_duplicate_step_ids() -> None:
    problems = graph_problems("""\
        runbook: x
        steps:
          - name: restart
            shell: x
          - name: Restart!
            shell: y
          - name: other
            id: restart
            shell: z
    """)
    assert [(p.code, at(p)) for p in problems] == [("duplicate-id", (5, 11)), ("duplicate-id", (8, 9))]
    assert problems[0].message == "duplicate step id `restart` (first used at line 3)"


def test_unknown_needs_with_did_you_mean() -> None:
    (p,) = graph_problems("runbook: x\nsteps:\n  - {name: measure, shell: x}\n  - {name: b, shell: x, needs: [measrue]}\n")
    assert p.code == "unknown-needs" and p.message == "step `b` needs unknown step `measrue`"
    assert p.hint == "did you mean `measure`?" and at(p) == (4, 33)


def test_needs_into_the_other_section_is_explained() -> None:
    (p,) = graph_problems("runbook: x\nsteps:\n  - {name: a, shell: x, needs: [page]}\non_failure:\n  - {name: page, shell: x}\n")
    assert p.hint and "on_failure" in p.hint


def test_self_dependency() -> None:
    (p,) = graph_problems("runbook: x\nsteps:\n  - name: a\n    shell: x\n    needs: [b, a]\n  - {name: b, shell: x, needs: []}\n")
    assert p.code == "self-dependency" and p.message == "step `a` needs itself" and at(p) == (5, 16)


def test_cycle_prints_its_path() -> None:
    (p,) = graph_problems("""\
        runbook: x
        steps:
          - name: a
            shell: x
            needs: [c]
          - name: b
            shell: x
          - name: c
            shell: x
    """)
    assert p.code == "cycle"
    assert p.message == "dependency cycle: a -> b -> c -> a"
    assert at(p) == (5, 13)  # the explicit `needs` entry that closes the loop


def test_cycle_in_on_failure() -> None:
    (p,) = graph_problems("runbook: x\nsteps: [{name: s, shell: x}]\non_failure:\n"
                          "  - {name: a, shell: x, needs: [b]}\n  - {name: b, shell: x, needs: [a]}\n")
    assert p.code == "cycle" and ("a -> b -> a" in p.message or "b -> a -> b" in p.message)


def test_all_graph_problems_together() -> None:
    problems = graph_problems("""\
        runbook: x
        steps:
          - {name: a, shell: x, needs: [zzz]}
          - {name: a, shell: x}
          - {name: c, shell: x, needs: [c]}
    """)
    assert sorted(p.code for p in problems) == ["duplicate-id", "self-dependency", "unknown-needs"]


# --- expansion over hosts ------------------------------------------------------------------------

def test_expand_gives_each_host_its_own_copy() -> None:
    tasks = expand(StepGraph.build(pb(DIAMOND)), ["h1", "h2"])
    assert len(tasks) == 8
    assert (("measure-usage", "h1"), ("clean-tmp", "h1")) in tasks.edges
    assert (("clean-tmp", "h2"), ("verify", "h2")) in tasks.edges
    assert not any(a[1] != b[1] for a, b in tasks.edges)  # no edge crosses hosts


def test_expand_once_runs_on_the_first_host_and_gates_every_host() -> None:
    g = StepGraph.build(pb("""\
        runbook: x
        steps:
          - {name: announce, shell: x, once: true}
          - {name: work, shell: x}
          - {name: report, shell: x, once: true}
    """))
    tasks = expand(g, ["h1", "h2", "h3"])
    assert set(tasks.nodes) == {("announce", "h1"), ("work", "h1"), ("work", "h2"), ("work", "h3"), ("report", "h1")}
    assert {b for a, b in tasks.edges if a == ("announce", "h1")} == {("work", "h1"), ("work", "h2"), ("work", "h3")}
    assert set(tasks.predecessors(("report", "h1"))) == {("work", "h1")}


def test_expand_subset_and_no_hosts() -> None:
    g = StepGraph.build(pb(DIAMOND))
    assert len(expand(g, [])) == 0
    sub = expand(g, ["h"], step_ids=["clean-tmp", "verify"])
    assert set(sub.nodes) == {("clean-tmp", "h"), ("verify", "h")}
    assert list(sub.edges) == [(("clean-tmp", "h"), ("verify", "h"))]
