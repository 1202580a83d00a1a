import {
  groupReproductions,
  notReproducible,
  recordedParameters,
  reproduceRequest,
  verdictText
} from '../reproduce-model';

const run = (id: string, time: number, tags: Record<string, string> = {}, reproducible: string[] = []) => ({
  run_id: id,
  start_time: time,
  tags,
  reproducible
});

describe('groupReproductions', () => {
  it('puts reproductions under their original, oldest first', () => {
    const runs = [
      run('r2', 400, { 'labyard.reproduces': 'a' }),
      run('b', 300),
      run('r1', 200, { 'labyard.reproduces': 'a' }),
      run('a', 100)
    ];
    expect(groupReproductions(runs).map(x => [x.run.run_id, x.depth])).toEqual([
      ['b', 0],
      ['a', 0],
      ['r1', 1],
      ['r2', 1]
    ]);
  });
  it('keeps a reproduction whose original is not listed', () => {
    expect(groupReproductions([run('r', 1, { 'labyard.reproduces': 'gone' })])).toEqual([
      { run: run('r', 1, { 'labyard.reproduces': 'gone' }), depth: 0 }
    ]);
  });
});

describe('words', () => {
  it('says what is missing', () => {
    expect(notReproducible(run('a', 1, {}, ['no image digest', 'no flavour']))).toBe(
      'not reproducible: no image digest, no flavour'
    );
    expect(notReproducible(run('a', 1))).toBeNull();
  });
  it('gives the verdict with its detail', () => {
    expect(verdictText(run('a', 1, { 'labyard.verdict': 'reproduced', 'labyard.verdict.detail': '3 metrics identical' }))).toBe('reproduced');
    expect(verdictText(run('a', 1, { 'labyard.verdict': 'differs', 'labyard.verdict.detail': 'rmse: 1 -> 2' }))).toBe('differs: rmse: 1 -> 2');
    expect(verdictText(run('a', 1))).toBeNull();
  });
});

describe('reproduceRequest', () => {
  const original = run('abc', 1, { 'labyard.parameters': '{"alpha": 1.0, "n": 3}' });
  const form = { parameters: recordedParameters(original), useCurrentData: false, tolerance: '', warnOnEnvironment: false };
  it('sends only what was changed', () => {
    expect(reproduceRequest(original, form)).toEqual({ reproduce: 'abc', environment: 'refuse' });
    expect(
      reproduceRequest(original, { ...form, parameters: '{"alpha": 0.5, "n": 3}', useCurrentData: true, tolerance: '0.01', warnOnEnvironment: true })
    ).toEqual({ reproduce: 'abc', parameters: { alpha: 0.5 }, use_current_data: true, tolerance: 0.01, environment: 'warn' });
  });
  it('names the field that is wrong', () => {
    expect(() => reproduceRequest(original, { ...form, parameters: '{alpha' })).toThrow(/^Parameters: not JSON/);
    expect(() => reproduceRequest(original, { ...form, parameters: '[1]' })).toThrow(/^Parameters: a JSON object/);
    expect(() => reproduceRequest(original, { ...form, tolerance: '-1' })).toThrow(/^Tolerance/);
  });
  it('reads a missing or broken parameters tag as none', () => {
    expect(recordedParameters(run('x', 1))).toBe('{}');
    expect(recordedParameters(run('x', 1, { 'labyard.parameters': 'oops' }))).toBe('{}');
  });
});
