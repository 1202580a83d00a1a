import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** What the server extension says about this server. */
export interface IServerInfo {
  user: string;
  project: string | null;
  flavor: string | null;
  mlflow_url: string | null;
}

/** The one REST client of the labyard_lab server extension. */
export class LabyardClient {
  constructor(private settings = ServerConnection.makeSettings()) {}

  async info(): Promise<IServerInfo> {
    return this.get<IServerInfo>('info');
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
