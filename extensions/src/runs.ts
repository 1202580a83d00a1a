import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { Dialog, showDialog } from '@jupyterlab/apputils';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Widget } from '@lumino/widgets';

import { LabyardClient } from './api';
import { openDiff } from './diff';
import { DiffSource, IDiffRequest, previousRun } from './diff-model';
import {
  groupReproductions,
  IReproduceForm,
  notReproducible,
  originalOf,
  recordedParameters,
  reproduceRequest,
  verdictText
} from './reproduce-model';
import { INotebookRuns, IReproductionRun, IRun, RunsClient } from './runs-api';

/** Opens a comparison in the main area (absent: no comparison buttons). */
export type CompareFn = (request: IDiffRequest, title: string) => void;

const REFRESH_MS = 10_000;
/** how often a reproduction that was started here is looked at until it is judged */
const FOLLOW_MS = 3_000;

/** The path of a document widget (a notebook), or null for anything else. */
function notebookPath(widget: Widget | null): string | null {
  const context = (widget as unknown as { context?: { path?: string } })?.context;
  const path = context?.path;
  return path && path.endsWith('.ipynb') ? path : null;
}

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props: Partial<HTMLElementTagNameMap[K]> & { className?: string } = {},
  children: (Node | string)[] = []
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children);
  return node;
}

function formatTime(ms: number | null): string {
  return ms ? new Date(ms).toLocaleString() : '';
}

function formatDuration(run: IRun): string {
  if (!run.start_time) {
    return '';
  }
  const end = run.end_time ?? Date.now();
  const s = Math.max(0, Math.round((end - run.start_time) / 1000));
  return s < 120 ? `${s} s` : `${Math.round(s / 60)} min`;
}

function formatValue(v: string | number | undefined): string {
  if (v === undefined) {
    return '—';
  }
  return typeof v === 'number' ? String(Number(v.toPrecision(6))) : v;
}

const KEY_ENTRIES = 4;

/** Keys whose values differ between the runs listed: the ones worth showing first. */
function varyingKeys(maps: Record<string, string | number>[]): Set<string> {
  const keys = new Set(maps.flatMap(m => Object.keys(m)));
  return new Set([...keys].filter(k => new Set(maps.map(m => String(m[k]))).size > 1));
}

/** The few entries shown in the table: varying ones first, then by name. */
function keyEntries<T>(map: Record<string, T>, varying: Set<string>): [string, T][] {
  const byName = (a: string, b: string) => a.toLowerCase().localeCompare(b.toLowerCase());
  return Object.entries(map)
    .sort(([a], [b]) => Number(varying.has(b)) - Number(varying.has(a)) || byName(a, b))
    .slice(0, KEY_ENTRIES);
}

/** Runs of the current notebook: status, key params and metrics, time, links; compare two. */
export class RunsPanel extends Widget {
  private notebook: string | null = null;
  private data: INotebookRuns | null = null;
  private selected: string[] = [];
  private timer: number | undefined;
  /** what the panel says about reproductions started from it */
  private notice: { text: string; error: boolean } | null = null;

  constructor(private client = new RunsClient(), private compare: CompareFn | null = null, private labyard = new LabyardClient()) {
    super();
    this.id = 'labyard-runs';
    this.addClass('labyard-runs');
    this.title.label = 'Runs';
    this.title.caption = 'MLflow runs of this notebook';
    this.title.iconClass = 'labyard-runs-icon';
    this.render();
  }

  setNotebook(path: string | null): void {
    if (path === this.notebook) {
      return;
    }
    this.notebook = path;
    this.data = null;
    this.selected = [];
    void this.refresh();
  }

  protected onAfterShow(): void {
    void this.refresh();
    this.timer = window.setInterval(() => void this.refresh(), REFRESH_MS);
  }

  protected onBeforeHide(): void {
    window.clearInterval(this.timer);
  }

  async refresh(): Promise<void> {
    if (!this.notebook) {
      this.render();
      return;
    }
    const asked = this.notebook;
    try {
      const data = await this.client.notebookRuns(asked);
      if (asked === this.notebook) {
        this.data = data;
        this.selected = this.selected.filter(id => data.runs.some(r => r.run_id === id));
        this.render();
      }
    } catch (error) {
      this.render(String((error as Error).message ?? error));
    }
  }

  private render(error?: string): void {
    const node = this.node;
    node.replaceChildren();
    if (!this.notebook) {
      node.append(el('p', { className: 'labyard-runs-empty', textContent: 'Open a notebook to see its runs.' }));
      return;
    }
    const refresh = el('button', { className: 'labyard-runs-refresh jp-Button', textContent: 'Refresh', title: 'Refresh' });
    refresh.onclick = () => void this.refresh();
    node.append(el('div', { className: 'labyard-runs-header' }, [el('strong', { textContent: this.notebook }), refresh]));
    if (error) {
      node.append(el('p', { className: 'labyard-runs-error', textContent: error }));
    }
    if (this.notice) {
      node.append(el('p', { className: `labyard-runs-notice${this.notice.error ? ' labyard-runs-error' : ''}`, textContent: this.notice.text }));
    }
    const data = this.data;
    if (!data) {
      if (!error) {
        node.append(el('p', { textContent: 'Loading…' }));
      }
      return;
    }
    const q = data.queue;
    const status = el('p', { className: 'labyard-runs-queue' });
    if (q.reachable === false) {
      status.textContent = `MLflow unreachable: ${q.queued_runs} run(s) kept in your queue, sent when it is back.`;
      status.title = q.last_error ?? '';
      status.classList.add('labyard-runs-queue-down');
    } else if (q.queued_runs > 0) {
      status.textContent = `${q.queued_runs} run(s) still being recorded.`;
    } else {
      status.textContent = 'All runs recorded.';
    }
    node.append(status);
    if (data.ui_url) {
      node.append(el('a', { className: 'labyard-runs-experiment', href: data.ui_url, target: '_blank', rel: 'noopener', textContent: `Open ${data.experiment_name} in MLflow` }));
    }
    if (!data.runs.length) {
      node.append(el('p', { className: 'labyard-runs-empty', textContent: 'No runs yet: run a cell that trains a model or logs a metric.' }));
      return;
    }
    node.append(this.runsTable(data.runs));
    const chosen = this.selected.map(id => data.runs.find(r => r.run_id === id)).filter((r): r is IRun => !!r);
    if (chosen.length === 2) {
      node.append(this.compareTable(chosen[0], chosen[1]));
    } else {
      node.append(el('p', { className: 'labyard-runs-hint', textContent: 'Select two runs to compare them.' }));
    }
  }

  private runsTable(runs: IRun[]): HTMLTableElement {
    const varying = {
      params: varyingKeys(runs.map(r => r.params)),
      metrics: varyingKeys(runs.map(r => r.metrics))
    };
    const head = el('tr', {}, ['', 'Run', 'Status', 'User', 'Started', 'Duration', 'Params', 'Metrics', 'Reproduce', ...(this.compare ? ['Compare'] : [])].map(h => el('th', { textContent: h })));
    const rows = groupReproductions(runs).map(({ run, depth }) => {
      const box = el('input', { type: 'checkbox', checked: this.selected.includes(run.run_id), title: 'Select to compare' });
      box.onchange = () => {
        this.selected = box.checked
          ? [...this.selected.filter(id => id !== run.run_id), run.run_id].slice(-2)
          : this.selected.filter(id => id !== run.run_id);
        this.render();
      };
      const keyParams = keyEntries(run.params, varying.params).map(([k, v]) => `${k}=${v}`).join(', ');
      const keyMetrics = keyEntries(run.metrics, varying.metrics).map(([k, v]) => `${k}=${formatValue(v)}`).join(', ');
      const row = el('tr', { className: 'labyard-runs-row' }, [
        el('td', {}, [box]),
        el('td', {}, [el('a', { href: run.url, target: '_blank', rel: 'noopener', textContent: run.name, className: 'labyard-runs-link' })]),
        el('td', { className: `labyard-runs-status labyard-runs-status-${run.status.toLowerCase()}`, textContent: run.status }),
        el('td', { className: 'labyard-runs-user', textContent: run.user ?? '' }),
        el('td', { textContent: formatTime(run.start_time) }),
        el('td', { textContent: formatDuration(run) }),
        el('td', { className: 'labyard-runs-params', textContent: keyParams, title: JSON.stringify(run.params, null, 1) }),
        el('td', { className: 'labyard-runs-metrics', textContent: keyMetrics, title: JSON.stringify(run.metrics, null, 1) }),
        el('td', { className: 'labyard-runs-reproduce-cell' }, this.reproduceCell(run)),
        ...(this.compare ? [el('td', { className: 'labyard-runs-compare-actions' }, this.compareButtons(run, runs))] : [])
      ]);
      row.dataset.runId = run.run_id;
      if (depth) {
        row.classList.add('labyard-runs-reproduction');
        row.dataset.reproduces = originalOf(run) ?? '';
      }
      return row;
    });
    return el('table', { className: 'labyard-runs-table' }, [el('thead', {}, [head]), el('tbody', {}, rows)]);
  }

  /** The verdict of a reproduction, what a run lacks to be reproduced, and "Reproduce…". */
  private reproduceCell(run: IRun): (HTMLElement | string)[] {
    const out: HTMLElement[] = [];
    const verdict = verdictText(run);
    if (verdict) {
      const v = run.tags['labyard.verdict'];
      out.push(el('span', { className: `labyard-runs-verdict labyard-runs-verdict-${v}`, textContent: verdict, title: run.tags['labyard.reproduce.changes'] ? `changed: ${run.tags['labyard.reproduce.changes']}` : '' }));
    } else if (originalOf(run)) {
      out.push(el('span', { className: 'labyard-runs-verdict', textContent: run.status === 'RUNNING' ? 'reproducing…' : 'no verdict' }));
    }
    const gaps = notReproducible(run);
    if (gaps) {
      out.push(el('span', { className: 'labyard-runs-not-reproducible', textContent: gaps }));
    }
    const button = el('button', { className: 'jp-Button labyard-runs-reproduce', textContent: 'Reproduce…', title: 'Run this again: the same notebook, parameters and environment (or with changes)' });
    button.disabled = (run.reproducible ?? []).includes('no notebook snapshot');
    button.onclick = () => void this.reproduce(run);
    out.push(button);
    if (this.compare && originalOf(run) && this.data?.runs.some(r => r.run_id === originalOf(run))) {
      const original = this.data.runs.find(r => r.run_id === originalOf(run)) as IRun;
      const b = el('button', { className: 'jp-Button labyard-runs-compare-original', textContent: 'Compare with original' });
      b.onclick = () => (this.compare as CompareFn)(this.pair(original, run), `${original.name} vs reproduction ${run.name}`);
      out.push(b);
    }
    return out;
  }

  /** The dialog ("Reproduce" / "Reproduce with changes"), then the request, then following it. */
  private async reproduce(run: IRun): Promise<void> {
    const params = el('textarea', { className: 'labyard-reproduce-parameters', value: recordedParameters(run), rows: 3, cols: 40 });
    const current = el('input', { type: 'checkbox', className: 'labyard-reproduce-current-data' });
    const tolerance = el('input', { type: 'text', className: 'labyard-reproduce-tolerance', value: '0', size: 8 });
    const warn = el('input', { type: 'checkbox', className: 'labyard-reproduce-warn' });
    const body = new Widget();
    body.addClass('labyard-reproduce-dialog');
    body.node.append(
      el('p', { textContent: `Run ${run.name} again: its notebook as recorded, in ${run.tags['labyard.project'] ?? 'its project'}, as you.` }),
      el('label', { textContent: 'Parameters (JSON; change them to reproduce with changes)' }, [el('br'), params]),
      el('br'),
      el('label', {}, [current, ' Use current data (the input files as they are now, even if they changed)']),
      el('br'),
      el('label', {}, ['Metrics tolerance (relative, 0 = exact) ', tolerance]),
      el('br'),
      el('label', {}, [warn, ' Run even if the environment differs from the recorded one (warn instead of refusing)'])
    );
    const result = await showDialog({ title: `Reproduce ${run.name}`, body, buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Reproduce' })] });
    if (!result.button.accept) {
      return;
    }
    const form: IReproduceForm = { parameters: params.value, useCurrentData: current.checked, tolerance: tolerance.value, warnOnEnvironment: warn.checked };
    try {
      const started = await this.labyard.reproduce(reproduceRequest(run, form));
      const warnings = started.reproduce?.warnings ?? [];
      this.notice = { text: `Reproducing ${run.name} (scheduled run ${started.id})${warnings.length ? `; warning: ${warnings.join('; ')}` : ''}`, error: false };
      this.render();
      void this.follow(started, run);
    } catch (error) {
      this.notice = { text: `Cannot reproduce ${run.name}: ${(error as Error).message}`, error: true };
      this.render();
    }
  }

  /** Wait for a reproduction to finish and reach MLflow with its verdict; then compare it with its original. */
  private async follow(started: IReproductionRun, original: IRun): Promise<void> {
    let run = started;
    while (!['succeeded', 'failed', 'cancelled'].includes(run.status)) {
      await new Promise(resolve => window.setTimeout(resolve, FOLLOW_MS));
      try {
        run = await this.labyard.getReproduction(run.id);
      } catch {
        // the scheduler restarted, or a hiccup: keep following
      }
    }
    for (let i = 0; i < 60; i++) {
      try {
        run = await this.labyard.getReproduction(run.id);
      } catch {
        // try again
      }
      await this.refresh();
      const mine = this.data?.runs.find(r => r.run_id === run.mlflow_run_id);
      if (mine && (mine.tags['labyard.verdict'] || run.status !== 'succeeded')) {
        this.notice = { text: `Reproduction of ${original.name}: ${verdictText(mine) ?? run.status}`, error: run.status !== 'succeeded' };
        this.render();
        if (this.compare) {
          this.compare(this.pair(original, mine), `${original.name} vs reproduction ${mine.name}`);
        }
        return;
      }
      await new Promise(resolve => window.setTimeout(resolve, FOLLOW_MS));
    }
    this.notice = { text: `The reproduction of ${original.name} (${run.id}) ${run.status}${run.error ? `: ${run.error}` : ''}; not in MLflow yet`, error: true };
    this.render();
  }

  /** The comparison of two runs: two scheduled runs by their executed notebooks (outputs
   * included), not by the snapshots they started from, which are the same notebook when only
   * the parameters changed; otherwise the notebooks the runs recorded. */
  private pair(a: IRun, b: IRun): IDiffRequest {
    const scheduled = (r: IRun) => r.tags['labyard.run_kind'] === 'scheduled';
    return scheduled(a) && scheduled(b)
      ? { base: { kind: 'mlflow', run_id: a.run_id, artifact: 'output' }, remote: { kind: 'mlflow', run_id: b.run_id, artifact: 'output' } }
      : { base: { kind: 'mlflow', run_id: a.run_id }, remote: { kind: 'mlflow', run_id: b.run_id } };
  }

  private compareButtons(run: IRun, runs: IRun[]): HTMLButtonElement[] {
    const compare = this.compare as CompareFn;
    const source = (r: IRun): DiffSource => ({ kind: 'mlflow', run_id: r.run_id });
    const pair = (a: IRun, b: IRun): IDiffRequest => this.pair(a, b);
    const previous = previousRun(runs.map(r => ({ id: r.run_id, time: r.start_time, run: r })), run.run_id);
    const buttons: HTMLButtonElement[] = [];
    if (previous) {
      const b = el('button', { className: 'jp-Button labyard-runs-compare-previous', textContent: 'Compare with previous run' });
      b.onclick = () => compare(pair(previous.run, run), `${previous.run.name} vs ${run.name}`);
      buttons.push(b);
    }
    const other = el('button', { className: 'jp-Button labyard-runs-compare-with', textContent: 'Compare with…' });
    other.onclick = async () => {
      const select = el('select', { className: 'labyard-compare-choice' });
      select.append(el('option', { value: '', textContent: `The notebook now (${this.notebook})` }));
      for (const r of runs.filter(r => r.run_id !== run.run_id)) {
        select.append(el('option', { value: r.run_id, textContent: `${r.name} (${formatTime(r.start_time)})` }));
      }
      const body = new Widget();
      body.node.append(el('label', { textContent: 'Compare this run with ' }, [select]));
      const result = await showDialog({ title: `Compare ${run.name} with…`, body, buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Compare' })] });
      if (!result.button.accept) {
        return;
      }
      const chosen = runs.find(r => r.run_id === select.value);
      if (chosen) {
        compare(pair(chosen, run), `${chosen.name} vs ${run.name}`);
      } else if (this.notebook) {
        compare({ base: source(run), remote: { kind: 'path', path: this.notebook } }, `${run.name} vs ${this.notebook}`);
      }
    };
    buttons.push(other);
    return buttons;
  }

  private compareTable(a: IRun, b: IRun): HTMLTableElement {
    const section = (title: string, x: Record<string, string | number>, y: Record<string, string | number>) => {
      const keys = [...new Set([...Object.keys(x), ...Object.keys(y)])].sort();
      return [
        el('tr', { className: 'labyard-runs-compare-section' }, [el('th', { colSpan: 3, textContent: title })]),
        ...keys.map(k => {
          const row = el('tr', {}, [el('td', { textContent: k }), el('td', { textContent: formatValue(x[k]) }), el('td', { textContent: formatValue(y[k]) })]);
          row.dataset.key = `${title}:${k}`;
          if (formatValue(x[k]) !== formatValue(y[k])) {
            row.classList.add('labyard-runs-differs');
          }
          return row;
        })
      ];
    };
    return el('table', { className: 'labyard-runs-compare' }, [
      el('thead', {}, [el('tr', {}, [el('th', { textContent: 'Compare' }), el('th', { textContent: a.name }), el('th', { textContent: b.name })])]),
      el('tbody', {}, [...section('Params', a.params, b.params), ...section('Metrics', a.metrics, b.metrics)])
    ]);
  }
}

/** A discreet status bar item: shown only while runs wait for an unreachable MLflow. */
function queueStatusItem(client: RunsClient, statusBar: IStatusBar, open: () => void): void {
  const item = new Widget();
  item.addClass('labyard-mlflow-status');
  item.node.onclick = open;
  const update = async () => {
    try {
      const q = await client.queueStatus();
      const down = q.reachable === false && q.queued_runs > 0;
      item.node.textContent = down ? `MLflow: ${q.queued_runs} queued` : '';
      item.node.title = down ? `MLflow is unreachable; your runs are kept and sent when it is back. ${q.last_error ?? ''}` : '';
    } catch {
      item.node.textContent = '';
    }
  };
  statusBar.registerStatusItem('labyard-lab:mlflow-status', { item, align: 'left', rank: 110 });
  void update();
  window.setInterval(() => void update(), 15_000);
}

/** The Runs panel in the right sidebar, following the current notebook. */
export const runsPlugin: JupyterFrontEndPlugin<void> = {
  id: 'labyard-lab:runs',
  description: 'Runs panel: the MLflow runs of the current notebook (and the autolog setting).',
  autoStart: true,
  requires: [ILabShell],
  optional: [IStatusBar, IRenderMimeRegistry],
  activate: (app: JupyterFrontEnd, labShell: ILabShell, statusBar: IStatusBar | null, rendermime: IRenderMimeRegistry | null) => {
    const labyard = new LabyardClient();
    const compare: CompareFn | null = rendermime ? (request, title) => openDiff(app, labyard, rendermime, request, title) : null;
    const panel = new RunsPanel(new RunsClient(), compare, labyard);
    app.shell.add(panel, 'right', { rank: 600 });
    const follow = () => {
      const path = notebookPath(labShell.currentWidget);
      if (path) {
        panel.setNotebook(path);
      }
    };
    labShell.currentChanged.connect(follow);
    follow();
    if (statusBar) {
      queueStatusItem(new RunsClient(), statusBar, () => labShell.activateById(panel.id));
    }
    app.commands.addCommand('labyard-lab:show-runs', {
      label: 'Show MLflow Runs of This Notebook',
      execute: () => {
        follow();
        labShell.activateById(panel.id);
      }
    });
  }
};
