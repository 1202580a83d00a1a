/**
 * The run-vs-run view: a main-area widget with the header (parameters and metrics that differ)
 * above the cells, rendered by nbdime's own NotebookDiffWidget from POST /labyard/diff.
 */
import { JupyterFrontEnd } from '@jupyterlab/application';
import { MainAreaWidget } from '@jupyterlab/apputils';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { Panel, Widget } from '@lumino/widgets';
import { NotebookDiffModel } from 'nbdime/lib/diff/model';
import { NotebookDiffWidget } from 'nbdime/lib/diff/widget';

import { LabyardClient } from './api';
import {
  describeSummary,
  differing,
  formatDelta,
  formatHeaderValue,
  IDiffHeader,
  IDiffRequest,
  IDiffResponse,
  IHeaderRow
} from './diff-model';

function el<K extends keyof HTMLElementTagNameMap>(tag: K, className: string, ...children: (Node | string)[]): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  node.className = className;
  node.append(...children);
  return node;
}

function headerTable(title: string, rows: IHeaderRow[], withDelta: boolean): HTMLElement {
  const table = el('table', 'labyard-diff-header-table');
  table.dataset.section = title.toLowerCase();
  table.append(
    el('tr', '', el('th', '', title), el('th', '', 'base'), el('th', '', 'remote'), ...(withDelta ? [el('th', '', 'delta')] : []))
  );
  for (const r of rows) {
    const row = el(
      'tr',
      `labyard-diff-row labyard-diff-${r.change}`,
      el('td', 'labyard-diff-name', r.name),
      el('td', 'labyard-diff-base', formatHeaderValue(r.base)),
      el('td', 'labyard-diff-remote', formatHeaderValue(r.remote)),
      ...(withDelta ? [el('td', 'labyard-diff-delta', formatDelta(r.delta))] : [])
    );
    row.dataset.name = r.name;
    row.title = r.change;
    table.append(row);
  }
  return table;
}

/** The header above the cells: sides, then parameters, metrics and provenance that differ. */
export function renderHeader(body: IDiffResponse): HTMLElement {
  const node = el('div', 'labyard-diff-header');
  node.append(
    el('div', 'labyard-diff-sides', el('span', 'labyard-diff-side-base', body.sources.base.label), ' → ', el('span', 'labyard-diff-side-remote', body.sources.remote.label)),
    el('div', 'labyard-diff-summary', describeSummary(body.summary))
  );
  const header: IDiffHeader | null = body.header;
  if (header) {
    const sections: [string, IHeaderRow[] | null | undefined, boolean][] = [
      ['Parameters', header.parameters, false],
      ['Metrics', header.metrics, true],
      ['Provenance', header.provenance, false]
    ];
    let any = false;
    for (const [title, rows, delta] of sections) {
      const shown = differing(rows);
      if (shown.length) {
        any = true;
        node.append(headerTable(title, shown, delta));
      }
    }
    if (!any) {
      node.append(el('p', 'labyard-diff-same', 'Same parameters, metrics and provenance.'));
    }
  }
  for (const w of body.warnings ?? []) {
    node.append(el('p', 'labyard-diff-warning', w));
  }
  return node;
}

/** Header + nbdime's widget, with "hide unchanged cells" as nbdime offers. */
export class RunDiffView extends Panel {
  constructor(private client: LabyardClient, private rendermime: IRenderMimeRegistry, private request: IDiffRequest) {
    super();
    this.addClass('labyard-diff');
    this.node.append(el('p', 'labyard-diff-loading', 'Comparing…'));
    void this.load();
  }

  private async load(): Promise<void> {
    let body: IDiffResponse;
    try {
      body = await this.client.diff(this.request);
    } catch (e) {
      this.node.replaceChildren(el('div', 'labyard-diff-error', String((e as Error).message ?? e)));
      return;
    }
    this.node.replaceChildren();
    const top = new Widget();
    top.node.append(renderHeader(body));
    const toggle = el('label', 'labyard-diff-toggle');
    const box = document.createElement('input');
    box.type = 'checkbox';
    box.checked = true;
    box.className = 'labyard-diff-hide-unchanged';
    toggle.append(box, ' Hide unchanged cells');
    top.node.append(toggle);
    this.addWidget(top);
    const model = new NotebookDiffModel(body.base as never, body.diff as never);
    const nbdime = new NotebookDiffWidget({ model, rendermime: this.rendermime });
    nbdime.addClass('labyard-diff-cells');
    const cells = new Panel();
    cells.addClass('nbdime-root');
    cells.addClass('labyard-diff-hiding');
    cells.addWidget(nbdime);
    box.onchange = () => cells.toggleClass('labyard-diff-hiding', box.checked);
    this.addWidget(cells);
    try {
      await nbdime.init();
    } catch (e) {
      cells.node.append(el('div', 'labyard-diff-error', `nbdime could not render this diff: ${(e as Error).message ?? e}`));
    }
  }
}

/** Open a comparison in the main area. */
export function openDiff(app: JupyterFrontEnd, client: LabyardClient, rendermime: IRenderMimeRegistry, request: IDiffRequest, title: string): void {
  const content = new RunDiffView(client, rendermime, request);
  const widget = new MainAreaWidget({ content });
  widget.id = `labyard-diff-${Date.now()}`;
  widget.title.label = title;
  widget.title.closable = true;
  widget.addClass('labyard-diff-widget');
  app.shell.add(widget, 'main');
  app.shell.activateById(widget.id);
}
