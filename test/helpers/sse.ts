/** A Server-Sent Events client for tests: fetch, parse frames, collect until the server ends the stream. */
export interface SseEvent {
  id?: string;
  event: string;
  data: string;
}

export interface SseResult {
  status: number;
  contentType: string | null;
  events: SseEvent[];
  comments: string[];
}

/** Reads the stream at `url` until it ends (or `until` says stop); frames parsed per the WHATWG rules we use. */
export async function readSse(
  url: string,
  headers: Record<string, string> = {},
  until?: (e: SseEvent, all: SseEvent[]) => boolean,
  timeoutMs = 60_000,
): Promise<SseResult> {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(new Error(`SSE ${url} did not end within ${timeoutMs} ms`)), timeoutMs);
  try {
    const res = await fetch(url, { headers: { accept: 'text/event-stream', ...headers }, signal: controller.signal });
    const result: SseResult = { status: res.status, contentType: res.headers.get('content-type'), events: [], comments: [] };
    if (res.status !== 200 || !res.body) {
      await res.text();
      return result;
    }
    const decoder = new TextDecoder();
    let buffer = '';
    let current: Partial<SseEvent> & { data?: string } = {};
    const reader = res.body.getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let nl: number;
      while ((nl = buffer.indexOf('\n')) >= 0) {
        const line = buffer.slice(0, nl).replace(/\r$/, '');
        buffer = buffer.slice(nl + 1);
        if (line === '') {
          if (current.data !== undefined) {
            const e: SseEvent = { event: current.event ?? 'message', data: current.data, ...(current.id !== undefined ? { id: current.id } : {}) };
            result.events.push(e);
            if (until?.(e, result.events)) {
              await reader.cancel();
              return result;
            }
          }
          current = {};
        } else if (line.startsWith(':')) {
          result.comments.push(line.slice(1).trim());
        } else {
          const i = line.indexOf(':');
          const field = i < 0 ? line : line.slice(0, i);
          const value = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
          if (field === 'data') current.data = current.data === undefined ? value : `${current.data}\n${value}`;
          else if (field === 'event') current.event = value;
          else if (field === 'id') current.id = value;
        }
      }
    }
    return result;
  } finally {
    clearTimeout(timer);
  }
}
