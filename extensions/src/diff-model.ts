/**
 * The run-vs-run comparison's pure logic: which run is "the previous one", the /labyard/diff
 * request, and the header rows (parameters and metrics that differ). No DOM, so jest tests it.
 */

/** One side of a diff, as POST /labyard/diff takes it (docs/dev/diff.md). */
export type DiffSource =
  | { kind: 'path'; path: string }
  | { kind: 'scheduled'; run_id: string; notebook?: 'output' | 'input' }
  | { kind: 'mlflow'; run_id: string; artifact?: 'notebook' | 'output' };

export interface IDiffOptions {
  ignore_outputs?: boolean;
  ignore_metadata?: boolean;
}

export interface IDiffRequest {
  base: DiffSource;
  remote: DiffSource;
  options?: IDiffOptions;
}

export type Change = 'same' | 'changed' | 'added' | 'removed' | 'unknown';

export interface IHeaderRow {
  name: string;
  base?: unknown;
  remote?: unknown;
  delta?: number | null;
  change: Change;
}

export interface IDiffHeader {
  base: { label?: string; [key: string]: unknown };
  remote: { label?: string; [key: string]: unknown };
  parameters: IHeaderRow[] | null;
  metrics: IHeaderRow[] | null;
  provenance?: IHeaderRow[] | null;
}

/** The answer of POST /labyard/diff (the parts the view uses). */
export interface IDiffResponse {
  base: Record<string, unknown>;
  diff: Record<string, unknown>[];
  summary: { cells_added: number; cells_removed: number; cells_modified: number; cells_unchanged: number; identical: boolean };
  sources: { base: { label: string }; remote: { label: string } };
  header: IDiffHeader | null;
  warnings?: string[];
}

/** Something with an id and a creation time: a scheduled run, an MLflow run. */
export interface IDated {
  id: string;
  time: number | null;
}

/** The run before `id` in time among `runs` (any order), or null when it is the first. */
export function previousRun<T extends IDated>(runs: T[], id: string): T | null {
  const me = runs.find(r => r.id === id);
  if (!me || me.time === null) {
    return null;
  }
  const earlier = runs.filter(r => r.id !== id && r.time !== null && (r.time as number) < (me.time as number));
  earlier.sort((a, b) => (b.time as number) - (a.time as number));
  return earlier[0] ?? null;
}

/** Rows worth showing above the cells: everything that is not the same on both sides. */
export function differing(rows: IHeaderRow[] | null | undefined): IHeaderRow[] {
  return (rows ?? []).filter(r => r.change !== 'same');
}

export function formatHeaderValue(v: unknown): string {
  if (v === undefined || v === null) {
    return '—';
  }
  if (typeof v === 'number') {
    return String(Number(v.toPrecision(6)));
  }
  return typeof v === 'string' ? v : JSON.stringify(v);
}

/** "+0.1", "−0.4" or "" (no delta: not numbers on both sides). */
export function formatDelta(delta: number | null | undefined): string {
  if (delta === undefined || delta === null || !Number.isFinite(delta)) {
    return '';
  }
  const s = formatHeaderValue(Math.abs(delta));
  return delta > 0 ? `+${s}` : delta < 0 ? `\u2212${s}` : '±0';
}

/** A one-line summary of the cell changes. */
export function describeSummary(s: IDiffResponse['summary']): string {
  if (s.identical) {
    return 'The notebooks are identical.';
  }
  const parts = [
    s.cells_modified ? `${s.cells_modified} cell(s) changed` : '',
    s.cells_added ? `${s.cells_added} added` : '',
    s.cells_removed ? `${s.cells_removed} removed` : '',
    `${s.cells_unchanged} unchanged`
  ].filter(Boolean);
  return parts.join(', ') + '.';
}

/** What to tell the person when the server refused or failed the diff. */
export function refusalMessage(status: number, message: string | undefined): string {
  const why = message || `the server answered ${status}`;
  if (status === 403) {
    return `Not allowed: ${why}`;
  }
  if (status === 404) {
    return `Not found: ${why}`;
  }
  if (status === 413) {
    return `Too large to compare: ${why}`;
  }
  if (status >= 500) {
    return `The comparison failed: ${why}`;
  }
  return `The comparison was refused: ${why}`;
}
