/** Reproductions in the Runs panel: pure helpers (tested with jest). */

/** What the panel needs of a run (a subset of IRun). */
export interface IRunLike {
  run_id: string;
  start_time: number | null;
  tags: Record<string, string>;
  reproducible?: string[];
}

/** The body of POST scheduler/runs (docs/admin/scheduler.md). */
export interface IReproduceRequest {
  reproduce: string;
  parameters?: Record<string, unknown>;
  use_current_data?: boolean;
  tolerance?: number;
  environment?: 'refuse' | 'warn';
}

/** The dialog's fields as typed. */
export interface IReproduceForm {
  parameters: string;
  useCurrentData: boolean;
  tolerance: string;
  warnOnEnvironment: boolean;
}

/** The run a reproduction reproduces (its `labyard.reproduces` tag), or null. */
export function originalOf(run: IRunLike): string | null {
  return run.tags['labyard.reproduces'] ?? null;
}

/**
 * Runs in panel order: originals newest first, each followed by its reproductions (oldest
 * first), with their depth (0 or 1). A reproduction whose original is not listed stays where
 * it is, as an original.
 */
export function groupReproductions<T extends IRunLike>(runs: T[]): { run: T; depth: number }[] {
  const ids = new Set(runs.map(r => r.run_id));
  const children = new Map<string, T[]>();
  const top: T[] = [];
  for (const run of runs) {
    const of = originalOf(run);
    if (of && ids.has(of) && of !== run.run_id) {
      children.set(of, [...(children.get(of) ?? []), run]);
    } else {
      top.push(run);
    }
  }
  const out: { run: T; depth: number }[] = [];
  for (const run of top) {
    out.push({ run, depth: 0 });
    const kids = [...(children.get(run.run_id) ?? [])].sort((a, b) => (a.start_time ?? 0) - (b.start_time ?? 0));
    out.push(...kids.map(k => ({ run: k, depth: 1 })));
  }
  return out;
}

/** "not reproducible: no image digest, no flavour", or null when nothing is missing. */
export function notReproducible(run: IRunLike): string | null {
  return run.reproducible && run.reproducible.length ? `not reproducible: ${run.reproducible.join(', ')}` : null;
}

/** The verdict of a reproduction, in words, or null (not a reproduction, or not judged yet). */
export function verdictText(run: IRunLike): string | null {
  const verdict = run.tags['labyard.verdict'];
  if (!verdict) {
    return null;
  }
  const detail = run.tags['labyard.verdict.detail'];
  return verdict === 'reproduced' ? 'reproduced' : detail ? `${verdict}: ${detail}` : verdict;
}

/** The recorded parameters of a run (its `labyard.parameters` tag), as JSON text for the dialog. */
export function recordedParameters(run: IRunLike): string {
  try {
    return JSON.stringify(JSON.parse(run.tags['labyard.parameters'] ?? '{}'));
  } catch {
    return '{}';
  }
}

/** The request for the dialog's fields; throws an Error naming the field that is wrong. */
export function reproduceRequest(run: IRunLike, form: IReproduceForm): IReproduceRequest {
  let parameters: unknown;
  try {
    parameters = JSON.parse(form.parameters.trim() || '{}');
  } catch (e) {
    throw new Error(`Parameters: not JSON (${(e as Error).message})`);
  }
  if (typeof parameters !== 'object' || parameters === null || Array.isArray(parameters)) {
    throw new Error('Parameters: a JSON object, e.g. {"alpha": 0.5}');
  }
  const recorded = JSON.parse(recordedParameters(run)) as Record<string, unknown>;
  const changed: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(parameters as Record<string, unknown>)) {
    if (JSON.stringify(recorded[k]) !== JSON.stringify(v)) {
      changed[k] = v;
    }
  }
  const tolerance = form.tolerance.trim() === '' ? 0 : Number(form.tolerance);
  if (!Number.isFinite(tolerance) || tolerance < 0 || tolerance > 1) {
    throw new Error('Tolerance: a number from 0 (exact) to 1');
  }
  const req: IReproduceRequest = { reproduce: run.run_id };
  if (Object.keys(changed).length) {
    req.parameters = changed;
  }
  if (form.useCurrentData) {
    req.use_current_data = true;
  }
  if (tolerance) {
    req.tolerance = tolerance;
  }
  req.environment = form.warnOnEnvironment ? 'warn' : 'refuse';
  return req;
}
