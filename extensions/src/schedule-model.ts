/**
 * The scheduler's data as the labyard-scheduler service sends it, and the pure helpers the
 * Schedule dialog uses (parameter parsing, cron validation and its human-readable preview).
 * Nothing here touches the DOM or JupyterLab, so jest tests it directly.
 */

export type RunStatus =
  | 'pending'
  | 'running'
  | 'succeeded'
  | 'failed'
  | 'cancelled';

export interface IParameterSpec {
  name: string;
  type: 'int' | 'float' | 'bool' | 'str' | 'list' | 'dict' | 'any';
  default: unknown;
  default_source: string;
  help: string;
}

export interface IFlavorChoice {
  name: string;
  display_name: string;
  gpus: number;
}

export interface IInspectResult {
  notebook_sha256: string;
  parameters: IParameterSpec[];
  flavors: IFlavorChoice[];
}

export interface ISchedule {
  id: string;
  name: string;
  owner: string;
  project: string;
  notebook: string;
  parameter_specs: IParameterSpec[];
  parameters: Record<string, unknown>;
  flavor: string;
  cron: string | null;
  timezone: string;
  timeout_seconds: number;
  retries: number;
  paused: boolean;
  /** Who paused it, or why the scheduler did (the owner left the project, the flavour is gone). */
  paused_reason?: string | null;
  next_run: string | null;
  run?: IScheduledRun;
}

export interface IScheduledRun {
  id: string;
  schedule_id: string;
  owner: string;
  notebook: string;
  parameters: Record<string, unknown>;
  trigger: 'manual' | 'cron' | 'once';
  status: RunStatus;
  created: string;
  started: string | null;
  finished: string | null;
  attempts: number;
  failed_cell: number | null;
  error: string | null;
  mlflow_run_id: string | null;
}

export interface IScheduleRequest {
  notebook: string;
  project?: string;
  name?: string;
  parameters: Record<string, unknown>;
  flavor?: string;
  cron: string | null;
  timezone: string;
  timeout_seconds: number;
  retries: number;
}

/** Timetables offered as one click. */
export const CRON_PRESETS: { label: string; cron: string }[] = [
  { label: 'Every hour', cron: '0 * * * *' },
  { label: 'Every day at 02:00', cron: '0 2 * * *' },
  { label: 'Weekdays at 07:00', cron: '0 7 * * 1-5' },
  { label: 'Every Monday at 06:00', cron: '0 6 * * 1' },
  { label: 'First day of the month at 03:00', cron: '0 3 1 * *' }
];

const DAYS = [
  'Sunday',
  'Monday',
  'Tuesday',
  'Wednesday',
  'Thursday',
  'Friday',
  'Saturday'
];
const RANGES: [number, number][] = [
  [0, 59],
  [0, 23],
  [1, 31],
  [1, 12],
  [0, 7]
];
const FIELD_NAMES = ['minute', 'hour', 'day of month', 'month', 'day of week'];

function checkField(field: string, index: number): string | null {
  const [lo, hi] = RANGES[index];
  for (const part of field.split(',')) {
    const m = /^(\*|(\d+)(?:-(\d+))?)(?:\/(\d+))?$/.exec(part);
    if (!m) {
      return `${FIELD_NAMES[index]}: cannot read "${part}"`;
    }
    for (const n of [m[2], m[3]]) {
      if (n !== undefined && (Number(n) < lo || Number(n) > hi)) {
        return `${FIELD_NAMES[index]}: ${n} is outside ${lo}-${hi}`;
      }
    }
    if (m[4] !== undefined && Number(m[4]) === 0) {
      return `${FIELD_NAMES[index]}: a step of 0`;
    }
  }
  return null;
}

/** Why a cron expression is invalid (5 fields: minute hour day-of-month month day-of-week), or null. */
export function cronError(expr: string): string | null {
  const fields = expr.trim().split(/\s+/);
  if (fields.length !== 5 || fields[0] === '') {
    return 'a cron expression has 5 fields: minute hour day-of-month month day-of-week';
  }
  for (let i = 0; i < 5; i++) {
    const error = checkField(fields[i], i);
    if (error) {
      return error;
    }
  }
  return null;
}

function pad(n: string): string {
  return n.padStart(2, '0');
}

/** A human-readable preview of a cron expression, e.g. "every day at 02:00 (Europe/Berlin)". */
export function describeCron(expr: string, timezone = 'UTC'): string {
  const error = cronError(expr);
  if (error) {
    return `invalid: ${error}`;
  }
  const [min, hour, dom, month, dow] = expr.trim().split(/\s+/);
  const num = /^\d+$/;
  const tz = ` (${timezone})`;
  if (min === '*' && hour === '*' && dom === '*' && month === '*' && dow === '*') {
    return 'every minute';
  }
  const step = /^\*\/(\d+)$/.exec(min);
  if (step && hour === '*' && dom === '*' && month === '*' && dow === '*') {
    return `every ${step[1]} minutes`;
  }
  if (num.test(min) && hour === '*' && dom === '*' && month === '*' && dow === '*') {
    return `every hour at minute ${Number(min)}`;
  }
  if (num.test(min) && num.test(hour)) {
    const at = `at ${pad(hour)}:${pad(min)}${tz}`;
    if (dom === '*' && month === '*' && dow === '*') {
      return `every day ${at}`;
    }
    if (dom === '*' && month === '*' && dow === '1-5') {
      return `on weekdays ${at}`;
    }
    if (dom === '*' && month === '*' && num.test(dow)) {
      return `every ${DAYS[Number(dow) % 7]} ${at}`;
    }
    if (num.test(dom) && month === '*' && dow === '*') {
      return `on day ${Number(dom)} of every month ${at}`;
    }
  }
  return `at "${expr.trim()}" (minute hour day-of-month month day-of-week)${tz}`;
}

/** The text the dialog shows for a parameter's value (JSON for lists, dicts and strings with quotes stripped). */
export function formatParameter(spec: IParameterSpec, value: unknown): string {
  if (value === undefined || value === null) {
    return spec.default_source;
  }
  if (spec.type === 'str' && typeof value === 'string') {
    return value;
  }
  return JSON.stringify(value);
}

/**
 * Read a parameter's value from the dialog's text, by the parameter's type.
 * Returns `{ value }` or `{ error }` naming the parameter.
 */
export function parseParameter(
  spec: IParameterSpec,
  text: string
): { value?: unknown; error?: string } {
  const t = text.trim();
  const fail = (what: string) => ({
    error: `${spec.name} must be ${what}, not "${text}"`
  });
  switch (spec.type) {
    case 'int':
      return /^[-+]?\d+$/.test(t) ? { value: parseInt(t, 10) } : fail('an integer');
    case 'float':
      return t !== '' && Number.isFinite(Number(t))
        ? { value: Number(t) }
        : fail('a number');
    case 'bool':
      if (['true', 'True', '1', 'yes'].includes(t)) {
        return { value: true };
      }
      if (['false', 'False', '0', 'no'].includes(t)) {
        return { value: false };
      }
      return fail('true or false');
    case 'str':
      return { value: text };
    case 'list':
    case 'dict':
    case 'any': {
      try {
        const value = JSON.parse(t);
        if (spec.type === 'list' && !Array.isArray(value)) {
          return fail('a JSON list');
        }
        if (
          spec.type === 'dict' &&
          (typeof value !== 'object' || value === null || Array.isArray(value))
        ) {
          return fail('a JSON object');
        }
        return { value };
      } catch {
        return spec.type === 'any' ? { value: text } : fail(`a JSON ${spec.type === 'list' ? 'list' : 'object'}`);
      }
    }
  }
}

/**
 * The parameters that differ from their defaults, from the dialog's texts; or the errors.
 */
export function collectParameters(
  specs: IParameterSpec[],
  texts: Record<string, string>
): { values: Record<string, unknown>; errors: string[] } {
  const values: Record<string, unknown> = {};
  const errors: string[] = [];
  for (const spec of specs) {
    const text = texts[spec.name];
    if (text === undefined || text === formatParameter(spec, spec.default)) {
      continue;
    }
    const parsed = parseParameter(spec, text);
    if (parsed.error) {
      errors.push(parsed.error);
    } else {
      values[spec.name] = parsed.value;
    }
  }
  return { values, errors };
}

/** Where a run's status is shown, and whether it may still change. */
/** When a schedule runs, as the Scheduled-runs panel says it: its timetable, and why it is paused. */
export function describeWhen(
  s: Pick<ISchedule, 'cron' | 'timezone' | 'paused' | 'paused_reason' | 'next_run'>,
  formatDate: (iso: string) => string = iso => new Date(iso).toLocaleString()
): string {
  if (!s.cron) {
    return 'run once';
  }
  const timetable = describeCron(s.cron, s.timezone);
  if (s.paused) {
    return `${timetable} — paused${s.paused_reason ? `: ${s.paused_reason}` : ''}`;
  }
  return s.next_run ? `${timetable} — next ${formatDate(s.next_run)}` : timetable;
}

export function isFinished(status: RunStatus): boolean {
  return status === 'succeeded' || status === 'failed' || status === 'cancelled';
}
