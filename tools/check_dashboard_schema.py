"""Type-check dashboards/rayloop.json against Grafana's own published schema types.

Grafana cannot be installed where rayloop is built, but Grafana publishes its dashboard model as
TypeScript types generated from its schema (npm ``@grafana/schema``). This writes the dashboard out as
TypeScript object literals typed with those types (the whole dashboard as ``Dashboard``, each row as
``RowPanel``, each time series panel with the time series plugin's ``Options`` and ``FieldConfig``) and
runs ``tsc --strict``: a missing required field, a value outside an enum, or a property the schema does
not know is an error. Two things are left out of the check, on purpose: ``__inputs`` and ``__requires``
(import metadata that Grafana's importer reads and does not store), and string enums are compared by
their values (JSON holds ``"list"``, TypeScript's ``LegendDisplayMode.List``).

    npm install --prefix .rayloop/grafana-schema @grafana/schema@13.2.3 typescript@7.0.2
    python tools/check_dashboard_schema.py --node-modules .rayloop/grafana-schema/node_modules

Exit status 0 when the dashboard type-checks, 1 with tsc's errors otherwise, 2 when the packages are not
installed. Not run by CI (it needs
the npm registry); docs/METRICS.md records its last result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "rayloop.json"
IMPORT_METADATA = ("__inputs", "__requires")
PANEL_TYPES = {"row": "Lit<RowPanel>", "timeseries": "TimeSeriesPanel"}

_PRELUDE = """\
import type { Dashboard, Panel, RowPanel } from '@grafana/schema';
import type { Options as TimeSeriesOptions, FieldConfig as TimeSeriesFieldConfig }
  from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';
// String enums (LegendDisplayMode.List = 'list', ...) as the string values a JSON file holds.
type Lit<T> = T extends string ? `${T}` : T extends Array<infer U> ? Array<Lit<U>>
  : T extends object ? { [K in keyof T]: Lit<T[K]> } : T;
type TimeSeriesPanel = Lit<Omit<Panel<TimeSeriesOptions, TimeSeriesFieldConfig>, 'options'>
  & { options: TimeSeriesOptions }>;
"""


def typescript_source(board: dict) -> str:
    """The dashboard as typed TypeScript declarations (raises for a panel type it has no types for)."""
    board = {key: value for key, value in board.items() if key not in IMPORT_METADATA}
    lines = [_PRELUDE, f"export const dashboard: Lit<Dashboard> = {json.dumps(board, indent=1)};"]
    for index, panel in enumerate(board.get("panels", [])):
        declared = PANEL_TYPES.get(panel.get("type"))
        if declared is None:
            raise ValueError(f"panel {index} ({panel.get('title')!r}): no schema types wired for {panel.get('type')!r}")
        lines.append(f"export const panel{index}: {declared} = {json.dumps(panel, indent=1)};")
    return "\n".join(lines) + "\n"


def check(dashboard: Path, node_modules: Path) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(dir=node_modules.parent) as directory:
        # Inside the npm prefix, so that '@grafana/schema' resolves from its node_modules.
        Path(directory, "dashboard.ts").write_text(typescript_source(json.loads(dashboard.read_text())))
        Path(directory, "tsconfig.json").write_text(json.dumps({
            "compilerOptions": {"strict": True, "noEmit": True, "module": "esnext", "moduleResolution": "bundler",
                                "target": "es2022", "skipLibCheck": True, "types": []},
            "files": ["dashboard.ts"],
        }))
        return subprocess.run([str(node_modules / ".bin" / "tsc"), "-p", directory], capture_output=True, text=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--node-modules", type=Path, required=True,
                        help="where @grafana/schema and typescript are installed")
    args = parser.parse_args(argv)
    node_modules = args.node_modules.resolve()
    package = node_modules / "@grafana" / "schema" / "package.json"
    if not package.exists() or not (node_modules / ".bin" / "tsc").exists():
        print(f"{node_modules} lacks @grafana/schema or typescript; install them as the module docstring says")
        return 2
    schema = json.loads(package.read_text())["version"]
    result = check(args.dashboard, node_modules)
    if result.returncode == 0:
        print(f"{args.dashboard}: type-checks against @grafana/schema {schema}")
        return 0
    print(result.stdout + result.stderr, end="")
    print(f"{args.dashboard}: does not type-check against @grafana/schema {schema}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
