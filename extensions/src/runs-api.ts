import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';


/** One MLflow run as the server extension reports it (GET /labyard/runs). */
export interface IRun {
  run_id: string;
  name: string;
  status: string;
  start_time: number | null;
  end_time: number | null;
  user: string | null;
  params: Record<string, string>;
  metrics: Record<string, number>;
  tags: Record<string, string>;
  url: string;
  /** what the run lacks to be reproduced (empty: nothing) */
  reproducible: string[];
}

/** The part of a scheduled run (labyard-scheduler) the Runs panel follows. */
export interface IReproductionRun {
  id: string;
  status: 'pending' | 'running' | 'succeeded' | 'failed' | 'cancelled';
  error: string | null;
  mlflow_run_id: string | null;
  reproduce: { of: string; changes: string[]; changed_inputs: string[]; warnings: string[] } | null;
}

/** What the user's kernels still have to send to MLflow. */
export interface IQueueStatus {
  reachable?: boolean | null;
  last_error?: string | null;
  last_sync?: number | null;
  queued_runs: number;
}

export interface INotebookRuns {
  project: string;
  notebook: string;
  experiment_name: string;
  experiment_id: string | null;
  ui_url: string | null;
  runs: IRun[];
  queue: IQueueStatus;
}

/** REST client for the runs part of the labyard_lab server extension. */
export class RunsClient {
  constructor(private settings = ServerConnection.makeSettings()) {}

  async queueStatus(): Promise<IQueueStatus> {
    const url = URLExt.join(this.settings.baseUrl, 'labyard', 'runs', 'status');
    const response = await ServerConnection.makeRequest(url, {}, this.settings);
    if (!response.ok) {
      throw new Error(`GET /labyard/runs/status failed with ${response.status}`);
    }
    return (await response.json()) as IQueueStatus;
  }

  async notebookRuns(notebook: string): Promise<INotebookRuns> {
    const url =
      URLExt.join(this.settings.baseUrl, 'labyard', 'runs') +
      URLExt.objectToQueryString({ notebook });
    const response = await ServerConnection.makeRequest(url, {}, this.settings);
    if (response.status === 404) {
      throw new Error(
        'The labyard_lab server extension is not enabled on this server (GET /labyard/runs answered 404).'
      );
    }
    const body = await response.json();
    if (!response.ok) {
      throw new Error(body.message ?? `GET /labyard/runs failed with ${response.status}`);
    }
    return body as INotebookRuns;
  }
}
