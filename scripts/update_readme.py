"""Copy the benchmark tables from scripts/results/*.md into README.md and docs/*.md between include markers.

    <!-- BEGIN scripts/results/NAME.md -->   ...   <!-- END scripts/results/NAME.md -->

Run after a benchmark (`make bench`, `make eval`, `make mutate` do it); tests/test_readme.py fails if they
drift apart.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATTERN = re.compile(r"(<!-- BEGIN (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- END (?P=path) -->)", re.S)


def render(readme: str) -> str:
    def sub(m: re.Match[str]) -> str:
        src = ROOT / m.group("path")
        body = src.read_text().rstrip("\n") + "\n" if src.exists() else f"_(not yet produced: run the script that writes {m.group('path')})_\n"
        return m.group(1) + body + m.group(4)

    return PATTERN.sub(sub, readme)


def documents() -> list[Path]:
    """Every Markdown page that may include results blocks."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main() -> int:
    for path in documents():
        old = path.read_text()
        new = render(old)
        if new != old:
            tmp = path.with_suffix(".md.tmp")
            tmp.write_text(new)
            tmp.replace(path)
            print(f"{path.relative_to(ROOT)} updated from scripts/results/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
