"""Rows as a fixed-width text table, a markdown table or JSON.

A table is its rows (plain JSON-able dicts, what `--json` prints), the
columns that render them, and notes printed under the text and markdown
forms.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Column:
  """One column: its header and how a row reads in it.

  `below`: in the text form the cell is printed on its own indented line
  under the row (a command too long for a grid); markdown keeps it a cell.
  """

  header: str
  cell: Callable[[dict], str]
  right: bool = False
  below: bool = False
  code: bool = False  # markdown shows the cell as `code`


@dataclasses.dataclass(frozen=True)
class Table:
  rows: list[dict]
  columns: Sequence[Column]
  notes: Sequence[str] = ()

  def text(self) -> str:
    grid = [c for c in self.columns if not c.below]
    cells = [[c.cell(r) for c in grid] for r in self.rows]
    widths = [max([len(c.header)] + [len(line[i]) for line in cells])
              for i, c in enumerate(grid)]

    def line(values):
      return '  '.join(
          v.rjust(w) if c.right else v.ljust(w)
          for v, w, c in zip(values, widths, grid)).rstrip()

    header = line([c.header for c in grid])
    out = [header, '-' * len(header)]
    for row, values in zip(self.rows, cells):
      out.append(line(values))
      out.extend(f'    {c.header}: {c.cell(row)}'
                 for c in self.columns if c.below)
    return '\n'.join(out + list(self.notes))

  def markdown(self) -> str:
    out = ['| ' + ' | '.join(c.header for c in self.columns) + ' |',
           '|' + '|'.join('---:' if c.right else '---'
                          for c in self.columns) + '|']
    for row in self.rows:
      cells = [c.cell(row).replace('|', '\\|') for c in self.columns]
      cells = [f'`{v}`' if c.code else v for v, c in zip(cells, self.columns)]
      out.append('| ' + ' | '.join(cells) + ' |')
    if self.notes:
      out.append('')
      out.extend(self.notes)
    return '\n'.join(out)

  def json(self) -> str:
    return json.dumps(self.rows, indent=1)


def signed_percent(fraction: float) -> str:
  """+1.23% / -0.40%: a deviation, never '-0.00%'."""
  return f'{round(fraction * 100, 2) + 0.0:+.2f}%'


def joined(values, fmt: str = 'g') -> str:
  """1/2.5/3: one value per progressive stage."""
  return '/'.join(format(v, fmt) for v in values)
