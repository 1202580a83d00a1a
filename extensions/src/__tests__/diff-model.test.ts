import { describeSummary, differing, formatDelta, formatHeaderValue, previousRun, refusalMessage } from '../diff-model';

describe('previousRun', () => {
  const runs = [
    { id: 'c', time: 300 },
    { id: 'a', time: 100 },
    { id: 'b', time: 200 },
    { id: 'x', time: null }
  ];
  it('finds the run just before, whatever the order', () => {
    expect(previousRun(runs, 'c')?.id).toBe('b');
    expect(previousRun(runs, 'b')?.id).toBe('a');
  });
  it('has none for the first run, an unknown id or an undated run', () => {
    expect(previousRun(runs, 'a')).toBeNull();
    expect(previousRun(runs, 'nope')).toBeNull();
    expect(previousRun(runs, 'x')).toBeNull();
  });
});

describe('header rows', () => {
  it('keeps only what differs', () => {
    const rows = [
      { name: 'lr', base: 0.1, remote: 0.5, change: 'changed' as const },
      { name: 'epochs', base: 2, remote: 2, change: 'same' as const },
      { name: 'seed', remote: 1, change: 'added' as const }
    ];
    expect(differing(rows).map(r => r.name)).toEqual(['lr', 'seed']);
    expect(differing(null)).toEqual([]);
  });
  it('formats values and deltas', () => {
    expect(formatHeaderValue(0.30000000000000004)).toBe('0.3');
    expect(formatHeaderValue(undefined)).toBe('—');
    expect(formatHeaderValue([1, 2])).toBe('[1,2]');
    expect(formatDelta(-0.4)).toBe('\u22120.4');
    expect(formatDelta(0.25)).toBe('+0.25');
    expect(formatDelta(null)).toBe('');
  });
  it('summarises the cells', () => {
    expect(describeSummary({ cells_added: 1, cells_removed: 0, cells_modified: 2, cells_unchanged: 3, identical: false })).toBe(
      '2 cell(s) changed, 1 added, 3 unchanged.'
    );
    expect(describeSummary({ cells_added: 0, cells_removed: 0, cells_modified: 0, cells_unchanged: 3, identical: true })).toMatch(/identical/);
  });
});

describe('refusalMessage', () => {
  it('says a refusal is a refusal, with the server message', () => {
    expect(refusalMessage(403, "run r-1 belongs to project 'nlp'")).toBe("Not allowed: run r-1 belongs to project 'nlp'");
    expect(refusalMessage(404, '')).toBe('Not found: the server answered 404');
    expect(refusalMessage(502, 'MLflow did not answer')).toMatch(/^The comparison failed/);
  });
});
