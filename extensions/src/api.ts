import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { IDiffRequest, IDiffResponse, refusalMessage } from './diff-model';
import { IReproduceRequest } from './reproduce-model';
import { IReproductionRun } from './runs-api';
import {
  IInspectResult,
  ISchedule,
  IScheduledRun,
  IScheduleRequest
} from './schedule-model';

/** What the server extension says about this server. */
export interface IServerInfo {
  user: string;
  project: string | null;
  /** the project's own name in the directory (project is its slug) */
  project_display_name: string | null;
  flavor: string | null;
  mlflow_url: string | null;
}

/** The one REST client of the labyard_lab server extension. */
export class LabyardClient {
  constructor(private settings = ServerConnection.makeSettings()) {}

  async info(): Promise<IServerInfo> {
    return this.get<IServerInfo>('info');
  }

  // ---- labyard-scheduler (through /labyard/scheduler/, on the user's behalf) ----
  inspectNotebook(notebook: string): Promise<IInspectResult> {
    return this.request('POST', 'scheduler/inspect', { notebook });
  }
  createSchedule(req: IScheduleRequest): Promise<ISchedule> {
    return this.request('POST', 'scheduler/schedules', req);
  }
  listSchedules(): Promise<ISchedule[]> {
    return this.request('GET', 'scheduler/schedules');
  }
  setPaused(id: string, paused: boolean): Promise<ISchedule> {
    return this.request('POST', `scheduler/schedules/${id}/${paused ? 'pause' : 'resume'}`);
  }
  deleteSchedule(id: string): Promise<void> {
    return this.request('DELETE', `scheduler/schedules/${id}`);
  }
  runNow(id: string, parameters: Record<string, unknown> = {}): Promise<IScheduledRun> {
    return this.request('POST', `scheduler/schedules/${id}/runs`, { parameters });
  }
  listRuns(scheduleId: string): Promise<IScheduledRun[]> {
    return this.request('GET', `scheduler/schedules/${scheduleId}/runs`);
  }
  getRun(id: string): Promise<IScheduledRun> {
    return this.request('GET', `scheduler/runs/${id}`);
  }
  cancelRun(id: string): Promise<IScheduledRun> {
    return this.request('POST', `scheduler/runs/${id}/cancel`);
  }
  /** Reproduce a recorded MLflow run (POST scheduler/runs): the reproduction's scheduled run. */
  reproduce(req: IReproduceRequest): Promise<IReproductionRun> {
    return this.request('POST', 'scheduler/runs', req);
  }
  getReproduction(id: string): Promise<IReproductionRun> {
    return this.request('GET', `scheduler/runs/${id}`);
  }
  /** Copy a run's output notebook into the project; returns its path there. */
  openRunOutput(id: string): Promise<{ path: string }> {
    return this.request('POST', `scheduler/runs/${id}/open`);
  }

  /** POST /labyard/diff; a refusal or failure throws an Error whose message says so plainly. */
  async diff(req: IDiffRequest): Promise<IDiffResponse> {
    const url = URLExt.join(this.settings.baseUrl, 'labyard', 'diff');
    const response = await ServerConnection.makeRequest(url, { method: 'POST', body: JSON.stringify(req) }, this.settings);
    const text = await response.text();
    let data: { message?: string } | undefined;
    try {
      data = text ? JSON.parse(text) : undefined;
    } catch {
      data = undefined;
    }
    if (!response.ok) {
      throw new Error(refusalMessage(response.status, data?.message));
    }
    return data as unknown as IDiffResponse;
  }

  /** A JSON request to the server extension; errors carry the server's `message`. */
  async request<T>(method: string, path: string, body?: unknown): Promise<T> {
    const url = URLExt.join(this.settings.baseUrl, 'labyard', path);
    const init: RequestInit = { method };
    if (body !== undefined || method === 'POST') {
      init.body = JSON.stringify(body ?? {});
    }
    const response = await ServerConnection.makeRequest(url, init, this.settings);
    const text = await response.text();
    const data = text ? JSON.parse(text) : undefined;
    if (!response.ok) {
      throw new Error(data?.message ?? `${method} ${path} failed with ${response.status}`);
    }
    return data as T;
  }

  private async get<T>(path: string): Promise<T> {
    const url = URLExt.join(this.settings.baseUrl, 'labyard', path);
    const response = await ServerConnection.makeRequest(url, {}, this.settings);
    if (response.status === 404) {
      throw new Error(
        'The labyard_lab server extension is not enabled on this server (GET /labyard/info answered 404).'
      );
    }
    const body = await response.json();
    if (!response.ok) {
      throw new Error(body.message ?? `GET ${path} failed with ${response.status}`);
    }
    return body as T;
  }
}
