"""report.md: the before/after report (report.py's dict) as a page a person reads top to bottom: the
verdict lines, the alarm, the held-out loss with the examples that moved most, the answers side by
side, the probe scores by kind, the multiple-choice accuracy."""

from __future__ import annotations


def report_markdown(report: dict) -> str:
    out = [f"# Before and after: {report.get('label') or report.get('adapter')}", "",
           f"Base model `{report.get('base')}`, adapter `{report.get('adapter')}`; made {report.get('made')} "
           f"in {report.get('seconds', {}).get('total', 0):.1f} s.", ""]
    out += [f"- {line}" for line in report.get("lines", [])]
    if report.get("alarm"):
        out += ["", f"**Overfitting alarm.** {report['alarm']}"]
    if report.get("lines") or report.get("alarm"):
        out.append("")
    out += _held_out(report.get("held_out"))
    out += _answers(report.get("answers"))
    for probe_set in report.get("probes", []):
        out += _probes(probe_set)
    out += _choices(report.get("choices"))
    notes = report.get("notes", [])
    if notes:
        out += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(out).rstrip() + "\n"


def _held_out(held: dict | None) -> list[str]:
    if not held:
        return []
    out = ["## Held-out loss", "", f"{held['examples']} examples ({held['where']}): base "
           f"**{held['base_loss']:.3f}**, tuned **{held['tuned_loss']:.3f}** (mean loss per learned token; lower "
           "is better).", ""]
    for title, rows in (("Most improved", held["improved"]), ("Most worsened", held["worsened"])):
        out.append(f"**{title}**" + ("" if rows else ": none"))
        out.append("")
        if rows:
            out += ["| line | base | tuned | prompt | its answer |", "|---:|---:|---:|---|---|"]
            out += [f"| {r['line']} | {r['base']:.3f} | {r['tuned']:.3f} | {_cell(r['prompt'])} | {_cell(r['answer'])} |"
                    for r in rows]
            out.append("")
    return out


def _answers(answers: list | None) -> list[str]:
    if not answers:
        return []
    out = ["## Answers side by side", "", "Greedy answers to held-out prompts the run never trained on"
           + (" (and to your own questions)" if any(not item["line"] for item in answers) else "") + ".", ""]
    for number, item in enumerate(answers, 1):
        where = f"line {item['line']}" if item["line"] else "your question"
        out += [f"### {number}. {_one_line(item['prompt'])} ({where})", "",
                f"- **Base:** {_one_line(item['base']) or '(nothing)'}" + (" *(cut at the length limit)*"
                                                                           if item.get("base_cut") else ""),
                f"- **Tuned:** {_one_line(item['tuned']) or '(nothing)'}" + (" *(cut at the length limit)*"
                                                                             if item.get("tuned_cut") else ""),
                *([f"- *The example's own answer:* {_one_line(item['reference'])}"] if item["reference"] else []), ""]
    return out


def _probes(probe_set: dict) -> list[str]:
    out = [f"## {probe_set['name'][:1].upper() + probe_set['name'][1:]}", "", probe_set["line"], "",
           "| kind | probes | base | tuned |", "|---|---:|---:|---:|"]
    out += [f"| {kind} | {row['probes']} | {row['base']} | {row['tuned']} |" for kind, row in probe_set["by_kind"].items()]
    changed = [item for item in probe_set["items"] if item["base_right"] != item["tuned_right"]]
    if changed:
        out += ["", "Probes answered differently:", "", "| prompt | expected | base | tuned |", "|---|---|---|---|"]
        out += [f"| {_cell(i['prompt'])} | {_cell(str(i['expected']) if i['match'] != 'no_refusal' else 'no refusal')} "
                f"| {_mark(i['base_right'])} {_cell(i['base'])} | {_mark(i['tuned_right'])} {_cell(i['tuned'])} |"
                for i in changed]
    return out + [""]


def _choices(choices: dict | None) -> list[str]:
    if not choices:
        return []
    out = ["## Multiple choice", "", choices["line"], ""]
    return out


def _mark(right: bool) -> str:
    return "✓" if right else "✗"


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _cell(text: str, limit: int = 120) -> str:
    return _one_line(text, limit).replace("|", "\\|")
