/**
 * "Schedule this notebook": a Schedule button in the notebook toolbar opening a dialog, and a
 * "Scheduled runs" side panel. Everything goes through LabyardClient to the server extension,
 * which calls the labyard-scheduler hub service on the user's behalf.
 */
import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { Dialog, showDialog, ToolbarButton } from '@jupyterlab/apputils';
import { DocumentRegistry, DocumentWidget } from '@jupyterlab/docregistry';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { historyIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { LabyardClient } from './api';
import { openDiff } from './diff';
import { DiffSource, previousRun } from './diff-model';
import {
  collectParameters,
  CRON_PRESETS,
  cronError,
  describeCron,
  describeWhen,
  formatParameter,
  IInspectResult,
  IParameterSpec,
  ISchedule,
  IScheduledRun,
  IScheduleRequest,
  isFinished
} from './schedule-model';

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props: Record<string, string> = {},
  ...children: (Node | string)[]
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === 'class') {
      node.className = value;
    } else {
      node.setAttribute(key, value);
    }
  }
  node.append(...children);
  return node;
}

function parameterRows(specs: IParameterSpec[], values: Record<string, unknown>): HTMLElement {
  const table = el('table', { class: 'labyard-schedule-params' });
  if (specs.length === 0) {
    table.append(el('tr', {}, el('td', {}, 'This notebook has no cell tagged "parameters".')));
  }
  for (const spec of specs) {
    const input = el('input', {
      'data-param': spec.name,
      'data-type': spec.type,
      value: formatParameter(spec, values[spec.name] ?? spec.default),
      title: spec.help || `${spec.type}, default ${spec.default_source}`
    });
    table.append(
      el('tr', {}, el('td', {}, el('label', {}, spec.name)), el('td', { class: 'labyard-type' }, spec.type), el('td', {}, input))
    );
  }
  return table;
}

function readParameters(node: HTMLElement, specs: IParameterSpec[]): Record<string, string> {
  const texts: Record<string, string> = {};
  node.querySelectorAll<HTMLInputElement>('input[data-param]').forEach(input => {
    texts[input.dataset.param as string] = input.value;
  });
  void specs;
  return texts;
}

/** The body of the Schedule dialog; getValue() returns the request or throws the errors. */
export class ScheduleForm extends Widget implements Dialog.IBodyWidget<IScheduleRequest> {
  constructor(private notebook: string, private info: IInspectResult) {
    super();
    this.addClass('labyard-schedule-dialog');
    const zone = Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC';
    const flavor = el('select', { name: 'flavor' });
    for (const f of info.flavors) {
      flavor.append(el('option', { value: f.name }, f.display_name));
    }
    const when = el('select', { name: 'when' });
    when.append(el('option', { value: 'now' }, 'Run once, now'));
    for (const p of CRON_PRESETS) {
      when.append(el('option', { value: p.cron }, `${p.label} (${p.cron})`));
    }
    when.append(el('option', { value: 'custom' }, 'Custom cron expression…'));
    const cron = el('input', { name: 'cron', placeholder: 'minute hour day month weekday, e.g. 30 2 * * 1-5' });
    const timezone = el('input', { name: 'timezone', value: zone });
    const preview = el('div', { class: 'labyard-cron-preview' });
    const update = () => {
      const custom = when.value === 'custom';
      cron.style.display = custom ? '' : 'none';
      const expr = custom ? cron.value : when.value;
      preview.textContent = when.value === 'now' ? 'Runs once, as soon as you click Schedule.' : describeCron(expr, timezone.value);
    };
    when.onchange = cron.oninput = timezone.oninput = update;
    update();
    this.node.append(
      el('p', {}, `Notebook: ${notebook} (snapshot ${info.notebook_sha256.slice(0, 12)})`),
      el('h3', {}, 'Parameters'),
      parameterRows(info.parameters, {}),
      el('h3', {}, 'Compute'),
      el('label', {}, 'Flavour ', flavor),
      el('h3', {}, 'When'),
      when,
      cron,
      el('label', {}, 'Timezone ', timezone),
      preview,
      el('h3', {}, 'Limits'),
      el('label', {}, 'Timeout (seconds) ', el('input', { name: 'timeout', type: 'number', min: '1', value: '3600' })),
      el('label', {}, ' Retries ', el('input', { name: 'retries', type: 'number', min: '0', max: '10', value: '0' })),
      el('div', { class: 'labyard-schedule-errors' })
    );
  }

  private field(name: string): HTMLInputElement {
    return this.node.querySelector(`[name=${name}]`) as HTMLInputElement;
  }

  getValue(): IScheduleRequest {
    const { values, errors } = collectParameters(this.info.parameters, readParameters(this.node, this.info.parameters));
    const when = this.field('when').value;
    const cron = when === 'now' ? null : when === 'custom' ? this.field('cron').value.trim() : when;
    if (cron !== null) {
      const error = cronError(cron);
      if (error) {
        errors.push(`cron: ${error}`);
      }
    }
    if (errors.length) {
      throw new Error(errors.join('; '));
    }
    return {
      notebook: this.notebook,
      parameters: values,
      flavor: this.field('flavor').value || undefined,
      cron,
      timezone: this.field('timezone').value.trim() || 'UTC',
      timeout_seconds: Number(this.field('timeout').value) || 3600,
      retries: Number(this.field('retries').value) || 0
    };
  }
}

function shortTime(r: IScheduledRun): string {
  return new Date(r.created).toLocaleString();
}

async function error(title: string, e: unknown): Promise<void> {
  await showDialog({ title, body: String((e as Error).message ?? e), buttons: [Dialog.okButton()] });
}

/** Ask for a schedule of `path` and create it; returns it (or null when cancelled). */
export async function scheduleNotebook(client: LabyardClient, path: string): Promise<ISchedule | null> {
  const info = await client.inspectNotebook(path);
  for (;;) {
    const result = await showDialog({
      title: 'Schedule this notebook',
      body: new ScheduleForm(path, info),
      buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Schedule' })],
      focusNodeSelector: 'input'
    });
    if (!result.button.accept) {
      return null;
    }
    if (result.value === null) {
      return null;
    }
    try {
      return await client.createSchedule(result.value);
    } catch (e) {
      await error('The schedule was refused', e);
    }
  }
}

/** The "Scheduled runs" side panel: schedules, their runs with live status, and actions. */
export class ScheduledRunsPanel extends Widget {
  private timer: number | undefined;

  constructor(private client: LabyardClient, private app: JupyterFrontEnd, private rendermime: IRenderMimeRegistry | null = null) {
    super();
    this.id = 'labyard-scheduled-runs';
    this.addClass('labyard-scheduled-runs');
    this.title.icon = historyIcon;
    this.title.caption = 'Scheduled runs';
  }

  protected onAfterShow(): void {
    void this.refresh();
    this.timer = window.setInterval(() => void this.refresh(), 3000);
  }

  protected onAfterHide(): void {
    window.clearInterval(this.timer);
  }

  async refresh(): Promise<void> {
    let schedules: ISchedule[];
    try {
      schedules = await this.client.listSchedules();
    } catch (e) {
      this.node.replaceChildren(el('p', { class: 'labyard-error' }, `Scheduler unavailable: ${(e as Error).message}`));
      return;
    }
    const runs = await Promise.all(schedules.map(s => this.client.listRuns(s.id).catch(() => [] as IScheduledRun[])));
    const list = el('div', {}, el('h2', {}, 'Scheduled runs'));
    if (schedules.length === 0) {
      list.append(el('p', {}, 'Nothing scheduled yet: use Schedule in a notebook’s toolbar.'));
    }
    schedules.forEach((s, i) => list.append(this.renderSchedule(s, runs[i])));
    this.node.replaceChildren(list);
  }

  private button(label: string, cls: string, action: () => Promise<unknown>): HTMLButtonElement {
    const b = el('button', { class: `jp-Button ${cls}` }, label);
    b.onclick = async () => {
      try {
        await action();
      } catch (e) {
        await error(label, e);
      }
      await this.refresh();
    };
    return b;
  }

  private renderSchedule(s: ISchedule, runs: IScheduledRun[]): HTMLElement {
    const when = describeWhen(s);
    const box = el(
      'div',
      { class: 'labyard-schedule', 'data-schedule': s.id },
      el('div', { class: 'labyard-schedule-title' }, `${s.name} · ${s.project} · ${s.flavor}`),
      el('div', { class: `labyard-schedule-when${s.paused ? ' labyard-schedule-paused' : ''}` }, when),
      el(
        'div',
        { class: 'labyard-schedule-actions' },
        this.button('Run now', 'labyard-run-now', () => this.client.runNow(s.id)),
        this.button('Run with…', 'labyard-rerun', () => this.rerun(s)),
        ...(s.cron ? [this.button(s.paused ? 'Resume' : 'Pause', 'labyard-pause', () => this.client.setPaused(s.id, !s.paused))] : []),
        this.button('Delete', 'labyard-delete', async () => {
          const ok = await showDialog({ title: `Delete schedule ${s.name}?`, buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Delete' })] });
          if (ok.button.accept) {
            await this.client.deleteSchedule(s.id);
          }
        })
      )
    );
    const table = el('ul', { class: 'labyard-runs' });
    for (const r of runs.slice(0, 10)) {
      const item = el(
        'li',
        { class: 'labyard-run', 'data-run': r.id, 'data-status': r.status },
        el('span', { class: `labyard-run-status labyard-status-${r.status}` }, r.status),
        ` ${new Date(r.created).toLocaleString()} (${r.trigger})`
      );
      if (r.error) {
        item.append(el('div', { class: 'labyard-run-error' }, r.failed_cell !== null ? `cell ${r.failed_cell}: ${r.error}` : r.error));
      }
      if (isFinished(r.status)) {
        item.append(
          this.button('Open output', 'labyard-run-open', async () => {
            const { path } = await this.client.openRunOutput(r.id);
            await this.app.commands.execute('docmanager:open', { path });
          })
        );
        if (this.rendermime) {
          const finished = runs.filter(x => isFinished(x.status)).map(x => ({ id: x.id, time: Date.parse(x.created) || null, run: x }));
          const previous = previousRun(finished, r.id);
          if (previous) {
            item.append(
              this.button('Compare with previous run', 'labyard-run-compare-previous', async () =>
                this.compare({ kind: 'scheduled', run_id: previous.id }, { kind: 'scheduled', run_id: r.id }, `${s.name}: previous run vs ${shortTime(r)}`)
              )
            );
          }
          item.append(
            this.button('Compare with…', 'labyard-run-compare', () => this.compareWith(s, r, finished.map(x => x.run))),
            this.button('Compare output with input', 'labyard-run-compare-input', async () =>
              this.compare({ kind: 'scheduled', run_id: r.id, notebook: 'input' }, { kind: 'scheduled', run_id: r.id }, `${s.name}: input vs output`)
            )
          );
        }
      } else {
        item.append(this.button('Cancel', 'labyard-run-cancel', () => this.client.cancelRun(r.id)));
      }
      table.append(item);
    }
    box.append(table);
    return box;
  }

  private async compare(base: DiffSource, remote: DiffSource, title: string): Promise<void> {
    openDiff(this.app, this.client, this.rendermime as IRenderMimeRegistry, { base, remote }, title);
  }

  /** Pick another run of the schedule, or the notebook as it is now, to compare `r` with. */
  private async compareWith(s: ISchedule, r: IScheduledRun, finished: IScheduledRun[]): Promise<void> {
    const select = el('select', { class: 'labyard-compare-choice' });
    select.append(el('option', { value: 'notebook' }, `The notebook now (${s.notebook})`));
    for (const other of finished.filter(x => x.id !== r.id)) {
      select.append(el('option', { value: other.id }, `Run of ${shortTime(other)} (${Object.entries(other.parameters).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(', ') || 'defaults'})`));
    }
    const body = new Widget();
    body.node.append(el('label', {}, 'Compare this run with ', select));
    const result = await showDialog({ title: `Compare the run of ${shortTime(r)} with…`, body, buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Compare' })] });
    if (!result.button.accept) {
      return;
    }
    const here: DiffSource = { kind: 'scheduled', run_id: r.id };
    if (select.value === 'notebook') {
      await this.compare(here, { kind: 'path', path: s.notebook }, `${s.name}: run vs notebook`);
    } else {
      await this.compare({ kind: 'scheduled', run_id: select.value }, here, `${s.name}: run vs run`);
    }
  }

  private async rerun(s: ISchedule): Promise<void> {
    const body = new Widget();
    body.node.append(parameterRows(s.parameter_specs, s.parameters));
    const result = await showDialog({
      title: `Run ${s.name} with…`,
      body,
      buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Run' })]
    });
    if (!result.button.accept) {
      return;
    }
    const specs = s.parameter_specs.map(p => ({ ...p, default: s.parameters[p.name] ?? p.default }));
    const { values, errors } = collectParameters(specs, readParameters(body.node, specs));
    if (errors.length) {
      throw new Error(errors.join('; '));
    }
    await this.client.runNow(s.id, values);
  }
}

/** The Schedule button of every notebook toolbar. */
class ScheduleButtonExtension implements DocumentRegistry.WidgetExtension {
  constructor(private client: LabyardClient, private panel: ScheduledRunsPanel, private app: JupyterFrontEnd) {}

  createNew(widget: Widget, context: DocumentRegistry.Context) {
    const button = new ToolbarButton({
      className: 'labyard-schedule-button',
      label: 'Schedule',
      icon: historyIcon,
      tooltip: 'Run this notebook now or on a timetable, with parameters',
      onClick: async () => {
        try {
          if (context.model.dirty) {
            await context.save();
          }
          const schedule = await scheduleNotebook(this.client, context.path);
          if (schedule) {
            this.app.shell.activateById(this.panel.id);
            await this.panel.refresh();
          }
        } catch (e) {
          await error('Cannot schedule this notebook', e);
        }
      }
    });
    (widget as DocumentWidget).toolbar.insertAfter('cellType', 'labyard-schedule', button);
    return button;
  }
}

export const schedulePlugin: JupyterFrontEndPlugin<void> = {
  id: 'labyard-lab:schedule',
  description: 'Schedule button in notebooks and the Scheduled runs panel.',
  autoStart: true,
  optional: [ILabShell, IRenderMimeRegistry],
  activate: (app: JupyterFrontEnd, _labShell: unknown, rendermime: IRenderMimeRegistry | null) => {
    const client = new LabyardClient();
    const panel = new ScheduledRunsPanel(client, app, rendermime);
    app.shell.add(panel, 'right', { rank: 700 });
    app.docRegistry.addWidgetExtension('Notebook', new ScheduleButtonExtension(client, panel, app));
  }
};
