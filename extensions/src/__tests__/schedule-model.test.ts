import {
  collectParameters,
  CRON_PRESETS,
  cronError,
  describeCron,
  describeWhen,
  IParameterSpec,
  parseParameter
} from '../schedule-model';

const spec = (name: string, type: IParameterSpec['type'], def: unknown): IParameterSpec => ({
  name,
  type,
  default: def,
  default_source: JSON.stringify(def),
  help: ''
});

const SPECS = [
  spec('epochs', 'int', 1),
  spec('lr', 'float', 0.1),
  { ...spec('name', 'str', 'baseline'), default_source: '"baseline"' },
  spec('layers', 'list', [1, 2]),
  spec('verbose', 'bool', false)
];

describe('cron preview', () => {
  it.each([
    ['* * * * *', 'every minute'],
    ['*/15 * * * *', 'every 15 minutes'],
    ['5 * * * *', 'every hour at minute 5'],
    ['0 2 * * *', 'every day at 02:00 (Europe/Berlin)'],
    ['30 7 * * 1-5', 'on weekdays at 07:30 (Europe/Berlin)'],
    ['0 6 * * 1', 'every Monday at 06:00 (Europe/Berlin)'],
    ['0 3 1 * *', 'on day 1 of every month at 03:00 (Europe/Berlin)'],
    ['0 0 1 1 *', 'at "0 0 1 1 *" (minute hour day-of-month month day-of-week) (Europe/Berlin)']
  ])('%s -> %s', (expr, text) => {
    expect(describeCron(expr, 'Europe/Berlin')).toBe(text);
  });

  it('rejects what the server would reject', () => {
    expect(cronError('every day')).toMatch(/5 fields/);
    expect(cronError('61 * * * *')).toBe('minute: 61 is outside 0-59');
    expect(cronError('0 24 * * *')).toBe('hour: 24 is outside 0-23');
    expect(cronError('*/0 * * * *')).toBe('minute: a step of 0');
    expect(describeCron('0 25 * * *')).toBe('invalid: hour: 25 is outside 0-23');
    for (const p of CRON_PRESETS) {
      expect(cronError(p.cron)).toBeNull();
    }
  });
});

describe('parameters', () => {
  it('parses by type', () => {
    expect(parseParameter(SPECS[0], '3')).toEqual({ value: 3 });
    expect(parseParameter(SPECS[0], '3.5').error).toBe('epochs must be an integer, not "3.5"');
    expect(parseParameter(SPECS[1], '1e-3')).toEqual({ value: 0.001 });
    expect(parseParameter(SPECS[2], 'big one')).toEqual({ value: 'big one' });
    expect(parseParameter(SPECS[3], '[3, 4]')).toEqual({ value: [3, 4] });
    expect(parseParameter(SPECS[3], '{"a": 1}').error).toBe('layers must be a JSON list, not "{"a": 1}"');
    expect(parseParameter(SPECS[4], 'True')).toEqual({ value: true });
    expect(parseParameter(SPECS[4], 'maybe').error).toMatch(/true or false/);
  });

  it('sends only the values changed from their defaults, or says what is wrong', () => {
    const texts = { epochs: '3', lr: '0.1', name: 'baseline', layers: '[1,2,3]', verbose: 'false' };
    expect(collectParameters(SPECS, texts)).toEqual({ values: { epochs: 3, layers: [1, 2, 3] }, errors: [] });
    const bad = collectParameters(SPECS, { ...texts, epochs: 'three', lr: 'x' });
    expect(bad.errors).toEqual(['epochs must be an integer, not "three"', 'lr must be a number, not "x"']);
  });
});

describe('when a schedule runs, as the panel says it', () => {
  const at = (iso: string) => `at ${iso}`;
  const cron = { cron: '0 2 * * *', timezone: 'UTC', next_run: '2026-12-02T02:00:00Z' };
  it('says the next time of an active schedule', () => {
    expect(describeWhen({ ...cron, paused: false, paused_reason: null }, at)).toBe(
      'every day at 02:00 (UTC) — next at 2026-12-02T02:00:00Z'
    );
  });
  it('says why a schedule is paused, for the owner and the project alike', () => {
    const reason = "bob is no longer a member of project 'vision'";
    expect(describeWhen({ ...cron, next_run: null, paused: true, paused_reason: reason }, at)).toBe(
      `every day at 02:00 (UTC) — paused: ${reason}`
    );
    expect(describeWhen({ ...cron, next_run: null, paused: true }, at)).toBe('every day at 02:00 (UTC) — paused');
  });
  it('says run once for a schedule without a timetable', () => {
    expect(describeWhen({ cron: null, timezone: 'UTC', paused: false, next_run: null }, at)).toBe('run once');
  });
});
