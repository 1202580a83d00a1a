import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Widget } from '@lumino/widgets';

import { LabyardClient } from './api';
import { runsPlugin } from './runs';
import { schedulePlugin } from './schedule';

/** Shows which project (and flavour) this JupyterLab server belongs to. */
const status: JupyterFrontEndPlugin<void> = {
  id: 'labyard-lab:status',
  description: 'Shows the Labyard project of this server in the status bar.',
  autoStart: true,
  optional: [IStatusBar],
  activate: async (app: JupyterFrontEnd, statusBar: IStatusBar | null) => {
    const client = new LabyardClient();
    const widget = new Widget();
    widget.addClass('labyard-status');
    widget.node.title = 'Labyard project of this server';
    try {
      const info = await client.info();
      const project = document.createElement('span');
      project.className = 'labyard-status-project';
      project.textContent = info.project_display_name ?? info.project ?? 'no project';
      if (info.project && info.project !== project.textContent) {
        project.title = info.project;
      }
      widget.node.append('Project: ', project);
      if (info.flavor) {
        widget.node.append(` · ${info.flavor}`);
      }
    } catch (error) {
      widget.node.textContent = 'Labyard: unavailable';
      widget.node.title = String(error);
      console.warn('labyard-lab:', error);
    }
    statusBar?.registerStatusItem('labyard-lab:status', {
      item: widget,
      align: 'left',
      rank: 100
    });
  }
};

export default [status, runsPlugin, schedulePlugin];
