"""Text for a person at 80 columns: help epilogues fitted to the width, the PASSED/FAILED summary
wrapped at its separators (and joined back for tests and scripts), tables that fit or become one
block per layer (a layer name is never cut)."""

from __future__ import annotations


def fit_epilog(text: str, width: int = 76) -> str:
    """Make an epilog of ``\\b`` blocks fit an 80-column terminal (click indents it by 2 and
    never rewraps a ``\\b`` block): prose lines are re-wrapped, a long example command is
    continued on the next line with a trailing backslash."""
    import textwrap

    out_blocks = []
    for block in text.strip("\n").split("\n\n"):
        lines = block.split("\n")
        head = lines[0] == "\b"
        body = lines[1:] if head else lines
        new: list[str] = []
        prose: list[str] = []

        def flush():
            if prose:
                new.extend(textwrap.wrap(" ".join(prose), width, break_on_hyphens=False))
                prose.clear()

        for ln in body:
            stripped = ln.strip()
            if ln.startswith("  normswap ") or ln.endswith(":") or not stripped:
                flush()
                if len(ln) <= width:
                    new.append(ln)
                    continue
                words, cur = stripped.split(" "), "  "
                for w in words:
                    if len(cur) + len(w) + 3 > width and cur.strip():
                        new.append(cur.rstrip() + " \\")
                        cur = "      "
                    cur += w + " "
                new.append(cur.rstrip())
            else:
                prose.append(stripped)
        flush()
        out_blocks.append("\n".join((["\b"] if head else []) + new))
    return "\n\n".join(out_blocks) + "\n"


def wrap_summary(line: str, width: int = 80) -> list[str]:
    """The summary line in lines of at most ``width`` columns (a single word longer than that,
    e.g. a path, stays whole): broken at its `` | `` separators first, then at spaces.  The
    first line always starts with ``PASSED | normswap JOB |`` (or FAILED); continuation lines
    are indented, so :func:`unwrap_summary` gives the one-line form back."""
    if len(line) <= width:
        return [line]
    chunks = line.split(" | ")
    if len(chunks) < 3:
        segments = [line]
    else:
        segments = [" | ".join(chunks[:3])] + ["| " + c for c in chunks[3:]]
    lines: list[str] = []
    cur = ""
    for i, seg in enumerate(segments):
        if cur and len(cur) + 1 + len(seg) <= width:
            cur += " " + seg
            continue
        if cur:
            lines.append(cur)
        indent = "" if i == 0 else "  "
        cur = indent
        for word in seg.split(" "):
            if cur.strip() and len(cur) + 1 + len(word) > width:
                lines.append(cur)
                cur = "    " + word
            else:
                cur += (" " if cur.strip() else "") + word
    if cur:
        lines.append(cur)
    return lines


def unwrap_summary(output: str) -> str:
    """The one-line summary from a command's output (the inverse of :func:`wrap_summary`): the
    last line that starts with PASSED or FAILED, joined with its indented continuation lines."""
    lines = output.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(("PASSED |", "FAILED |")):
            block = [lines[i]] + [ln for ln in lines[i + 1:] if ln.startswith("  ")]
            return " ".join(ln.strip() for ln in block)
    return lines[-1] if lines else ""


def fits(console, renderable) -> bool:
    """Does ``renderable`` (a rich Table) fit the console at its natural width, i.e. without
    folding any cell?"""
    from rich.measure import Measurement

    try:
        wide = console.options.update(max_width=10 ** 6)
        return Measurement.get(console, wide, renderable).maximum <= console.width
    except Exception:  # noqa: BLE001 - measuring is only a layout choice
        return True


def print_stacked(console, title: str, headers: list[str], rows: list[list], *, name_style: str = "bold") -> None:
    """A table too wide for the terminal, one block per row: the first cell (a layer name, never
    cut) on a line of its own, then its ``header value`` pairs packed into indented lines, each
    pair whole (a pair longer than a line gets a line of its own, uncut)."""
    from rich.text import Text

    width = max(20, console.width)
    console.print(title, style="italic", markup=False)
    for row in rows:
        name = row[0].copy() if isinstance(row[0], Text) else Text(str(row[0]))
        name.stylize(name_style)
        console.print(name, overflow="ignore", crop=False, soft_wrap=True)
        items = []
        for h, v in zip(headers[1:], row[1:]):
            text = v if isinstance(v, Text) else Text(str(v) if v is not None else "")
            if text.plain:
                items.append(Text.assemble((f"{h} ", "dim"), text))
        line, indent = Text("    "), 4
        for item in items:
            if len(line.plain) > indent and len(line.plain) + 2 + len(item.plain) > width:
                console.print(line, overflow="ignore", crop=False, soft_wrap=True)
                line = Text("    ")
            if len(line.plain) > indent:
                line.append("  ")
            line.append_text(item)
        if len(line.plain) > indent:
            console.print(line, overflow="ignore", crop=False, soft_wrap=True)
